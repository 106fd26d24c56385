"""Sample images for FID: class-balanced, resumable, split over ranks (RANK / WORLD_SIZE, or srun's tasks).

    sfd sample-fid runs/demo_digits/checkpoints/step_0001500 --num-images 1000 --out fid/demo
    sfd sample-fid official.pt --config model/sfd_xl --config run.yaml --num-images 50000 \\
        --out fid/xl --texture-vae ldm-imagenet256-f16d32-50ep.ckpt sample.cfg_scale=1.5

Writes <out>/images/*.png, per-batch parts and, once every rank is done, <out>/samples_NxHxWx3.npz (ADM
format) and <out>/grid.png (sfd_scale/eval/fid_sampling.py). Rerun the same command to continue after a kill.
An sfd_scale checkpoint directory brings its config (each --config file, then the overrides, layer on top); an
official checkpoint needs --config. Non-demo data decodes with the texture VAE (--texture-vae or
sample.texture_vae) and the latent statistics the checkpoint carries (an official one: data.path or
sample.latent_stats). Model, guide and VAE run on train.device (auto: the GPU when one is visible).
"""
import time

from ..cli import add_progress_flag, as_user_errors, command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd sample-fid", __doc__.split("\n\n")[0], run_config=True)
    parser.add_argument("checkpoint", help="sfd_scale checkpoint directory, a run directory (its newest checkpoint), "
                                           "or an official .pt / .safetensors")
    parser.add_argument("--num-images", type=int, required=True, help="e.g. 50000 (50 per class for 1000 classes)")
    parser.add_argument("--out", required=True, help="output directory (reused to resume)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML")
    parser.add_argument("--batch", type=int, default=64, help="images per sampling batch (default 64)")
    parser.add_argument("--texture-vae", default=None, help="texture VAE weights (sets sample.texture_vae)")
    parser.add_argument("--no-png", action="store_true", help="write only the npz parts, no per-image PNGs")
    add_progress_flag(parser, "a bar on rank 0")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    from ..eval.fid_sampling import FidSamplingError, rank_and_world, sample_for_fid
    from ..eval.generate import prepare_sampling, resolve_checkpoint
    from ..parallel.slurm_env import slurm_rendezvous

    overrides = args.overrides + ([f"sample.texture_vae={args.texture_vae}"] if args.texture_vae else [])
    with as_user_errors(ValueError, KeyError, FileNotFoundError):  # a checkpoint that does not fit the config
        if args.num_images < 1 or args.batch < 1:
            raise FidSamplingError(f"--num-images ({args.num_images}) and --batch ({args.batch}) must be >= 1")
        slurm_rendezvous()  # srun tasks: RANK / WORLD_SIZE / LOCAL_RANK from SLURM's variables
        rank, world = rank_and_world()
        checkpoint = resolve_checkpoint(args.checkpoint)  # a run directory: its newest checkpoint, recorded as such
        run = prepare_sampling(checkpoint, args.config, overrides)
        cfg = run.cfg
        start = time.monotonic()
        result = sample_for_fid(run.model, cfg, args.out, args.num_images, run.decode, batch_size=args.batch,
                                num_classes=run.num_classes, guide=run.guide, rank=rank, world_size=world,
                                device=run.device, png=not args.no_png, checkpoint=str(checkpoint.resolve()),
                                progress=args.progress)
    secs = time.monotonic() - start
    done = (f"all {args.num_images} images merged into {result.npz} (grid {result.grid})" if result.complete
            else "other ranks' parts are still missing: the last rank to finish merges")
    print(f"rank {rank}/{world}: sampled {result.sampled} images ({result.skipped} of this rank's share were "
          f"already there) in {secs:.1f} s ({result.sampled / max(secs, 1e-9):.1f} img/s) with "
          f"{cfg.sample.method} x {cfg.sample.num_steps}, guidance {cfg.sample.guidance}, seed {cfg.sample.seed}; "
          f"{done}.")
    return 0
