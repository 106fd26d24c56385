"""The configs shipped with the package: ``sfd configs`` lists them by the names ``--config`` takes,
``sfd configs NAME`` prints one, ``sfd configs --path [NAME]`` where it is.

A config of your own can build on a shipped one by name, from any directory (an ``includes`` entry is looked
for beside the including file first, then among the shipped configs):

    includes: [experiments/sfd_xl]
    data: {path: /data/in256_latents}
"""
from ..cli import command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd configs", __doc__)
    parser.add_argument("name", nargs="?", help="a shipped config, e.g. demo/digits (default: list them all)")
    parser.add_argument("--path", action="store_true", help="print the file's path (or the folder's) instead")
    args = parser.parse_args(argv)
    from ..config import find_config_file
    from ..resources import CONFIGS, shipped_configs

    if args.name is None:
        print(CONFIGS.resolve() if args.path else "\n".join(shipped_configs()))
        return 0
    path = find_config_file(args.name)  # not found: a ConfigError naming where it looked (one line, exit 2)
    print(path.resolve() if args.path else path.read_text(), end="\n" if args.path else "")
    return 0
