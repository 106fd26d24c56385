"""Train the Semantic VAE: ``python tools/train_semvae.py --config configs/semvae/tiny_cpu.yaml [key=value ...]``."""
import sys

from sfd_scale.cli import config_parser, entry_point
from sfd_scale.semvae.train import load_semvae_config, semvae_summary_text, train_semvae


@entry_point
def main(argv=None) -> int:
    """Exit status 2 with one line on stderr for a config or start-up problem (data directory, resume state)."""
    args = config_parser(__doc__, run_config=False).parse_intermixed_args(argv)
    cfg = load_semvae_config(args.config, args.overrides)
    image_source = None
    if cfg.data.source == "images":  # the data layer's: DALI decoding, random crops, DINOv2 per batch
        from sfd_scale.data.semvae_images import ImageFeatures as image_source
    summary = train_semvae(cfg, image_source)
    print(semvae_summary_text(summary, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
