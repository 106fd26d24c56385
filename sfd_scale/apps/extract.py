"""Extract SFD latent shards from an image folder (DALI decode, texture VAE + DINOv2 + Semantic VAE).

    sfd extract --config extract/imagenet256 input=/data/imagenet/train output=/data/sfd_latents \\
        texture_vae=/w/ldm-imagenet256-f16d32-50ep.ckpt dino=/w/dinov2_vitb14_reg4_pretrain.pth \\
        semvae=/w/semvae.safetensors
    RANK=r WORLD_SIZE=n sfd extract ...          # n independent jobs (e.g. a SLURM array)
    sfd extract --config ... --finalize-only     # merge finished parts + statistics

Rerunning the same command resumes: finished parts are kept, only missing chunks are encoded. The key=value
arguments are the keys of ``sfd_scale/data/extract_settings.py`` (``progress=true`` forces the bar off a
terminal). The work is ``sfd_scale.data.extract``.
"""
from ..cli import config_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], run_config=False, prog="sfd extract")
    parser.add_argument("--finalize-only", action="store_true", help="only merge finished parts and write statistics")
    args = parser.parse_intermixed_args(argv)
    from ..data.extract_settings import load_extract_config

    cfg = load_extract_config(args.config, args.overrides)  # config and input problems: one line, before torch
    from ..data import extract

    summary = extract.extract(cfg, *extract.rank_world(), finalize_only=args.finalize_only)
    print(extract.summary_text(summary), flush=True)
    return 0
