"""Train the Semantic VAE: ``python tools/train_semvae.py --config configs/semvae/tiny_cpu.yaml [key=value ...]``."""
import sys

from sfd_scale.cli import config_parser
from sfd_scale.config import ConfigError
from sfd_scale.semvae.train import load_semvae_config, semvae_summary_text, train_semvae


def main(argv=None) -> None:
    args = config_parser(__doc__).parse_intermixed_args(argv)
    try:
        cfg = load_semvae_config(args.config, args.overrides)
        summary = train_semvae(cfg)
    except ConfigError as err:  # also start-up problems found by train_semvae (data directory, resume state)
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    print(semvae_summary_text(summary, cfg))


if __name__ == "__main__":
    main()
