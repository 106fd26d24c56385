"""Print the architecture and per-part parameter counts of a LightningDiT / SFD model.

    sfd summary LightningDiT-XL/1 --in-channels 32 --no-repa --plain
    sfd summary LightningDiT-XXL/1 --in-channels 48 --semantic-chans 16 --repa-projector-dim 2048
    sfd summary --config experiments/sfd_xxl [key=value ...]

The model is built on the meta device (no weight memory), so even the 1.6B model is instant.
All logic lives in ``sfd_scale.models.summary``; this file only parses arguments and prints.
"""
from __future__ import annotations

from ..cli import as_user_errors, command_parser, entry_point


def parse(argv):
    p = command_parser("sfd summary", __doc__.split("\n\n")[0], run_config=True)
    p.add_argument("name", nargs="?", help="registry name, e.g. LightningDiT-XL/1 (not with --config)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="training config file(s), merged in order; positional key=value overrides follow")
    p.add_argument("--in-channels", type=int, default=48)
    p.add_argument("--semantic-chans", type=int, default=None, help="semantic part of in-channels (0 = plain)")
    p.add_argument("--plain", action="store_true", help="single time embedder (no SFD dual time embedding)")
    p.add_argument("--no-repa", dest="use_repa", action="store_false", help="no REPA projector")
    p.add_argument("--repa-projector-dim", type=int, default=2048)
    p.add_argument("--repa-feature-dim", type=int, default=768)
    p.add_argument("--repa-depth", type=int, default=2)
    p.add_argument("--input-size", type=int, default=16, help="latent side length")
    p.add_argument("--learn-sigma", action="store_true")
    p.add_argument("--wo-shift", action="store_true")
    args, rest = p.parse_known_args(argv)
    # with --config the positional "name" slot and any leftovers are key=value overrides
    overrides = ([args.name] if args.config and args.name else []) + rest
    if rest and not args.config or any("=" not in o for o in overrides):
        p.error(f"unrecognised arguments: {' '.join(o for o in overrides if '=' not in o) or ' '.join(rest)}")
    if not args.config and not args.name:
        p.error("give a model name or --config")
    # model flags would be silently ignored next to a config: its model section decides there
    flags = [a for a in vars(args) if a not in ("name", "config") and getattr(args, a) != p.get_default(a)]
    if args.config and flags:
        p.error(f"model flags {flags} do not combine with --config; use key=value overrides (model.*, sfd.*)")
    return args, overrides


@entry_point
def main(argv=None) -> int:
    args, overrides = parse(argv)
    from ..config import load_config, model_args, sfd_spec

    cfg = load_config(args.config, overrides) if args.config else None  # before torch: a typo is one line
    from ..models import summary

    with as_user_errors(ValueError, TypeError):  # the model flags' values; messages name the bad key/flag
        if cfg is not None:
            result = summary.summarize(model_args(cfg), cfg.model.name, sfd_spec(cfg))
        else:
            model, spec = summary.cli_args(
                args.name, in_channels=args.in_channels, semantic_chans=args.semantic_chans, plain=args.plain,
                use_repa=args.use_repa, repa_projector_dim=args.repa_projector_dim,
                repa_feature_dim=args.repa_feature_dim, repa_depth=args.repa_depth, input_size=args.input_size,
                learn_sigma=args.learn_sigma, wo_shift=args.wo_shift)
            result = summary.summarize(model, args.name, spec)
    print(summary.format_table(result))
    return 0
