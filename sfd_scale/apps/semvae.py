"""Train the Semantic VAE: ``sfd semvae --config semvae/tiny_cpu [key=value ...]``.

The keys are those of ``sfd_scale/semvae/settings.py``; a run continues from ``<train.output_dir>/semvae_state.pt``
when it is there. Exit status 2 with one line on stderr for a config or start-up problem (data directory,
resume state).
"""
from ..cli import config_parser, entry_point


@entry_point
def main(argv=None) -> int:
    args = config_parser(__doc__.split("\n\n")[0], run_config=False, prog="sfd semvae").parse_intermixed_args(argv)
    from ..semvae.settings import load_semvae_config

    cfg = load_semvae_config(args.config, args.overrides)  # before torch: a typo is one line in a second
    from ..semvae.train import semvae_summary_text, train_semvae

    image_source = None
    if cfg.data.source == "images":  # the data layer's: DALI decoding, random crops, DINOv2 per batch
        from ..data.semvae_images import ImageFeatures as image_source
    summary = train_semvae(cfg, image_source)
    print(semvae_summary_text(summary, cfg))
    return 0
