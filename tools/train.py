"""Train an SFD model: ``python tools/train.py --config configs/demo/digits.yaml [key=value ...]``."""
from sfd_scale.cli import config_parser, parse_config
from sfd_scale.train.trainer import Trainer, summary_text


def main(argv=None) -> None:
    _, cfg = parse_config(config_parser(__doc__), argv)
    summary = Trainer(cfg).fit()
    print(summary_text(summary, cfg))


if __name__ == "__main__":
    main()
