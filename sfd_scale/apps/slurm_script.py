"""The SLURM batch scripts shipped with the package (``train``, ``extract_array``, ``sample``, ``fid50k``,
``study_eval``; ``common.sh`` holds what they share). Each runs the installed ``sfd`` command (else ``python -m
sfd_scale`` of the environment sbatch exports) in the directory it was submitted from:

    sbatch --gpus-per-node=8 --ntasks-per-node=8 "$(sfd slurm-script --path train)" experiments/sfd_xl data.path=...
    sfd slurm-script train > train.sbatch         # a copy to edit (#SBATCH defaults); it still finds common.sh
    sfd slurm-script                              # the list
"""
from ..cli import command_parser, entry_point
from ..errors import MissingInputError


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd slurm-script", __doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="train, extract_array, sample, fid50k, study_eval or common.sh "
                                                "(.sbatch optional; default: list them)")
    parser.add_argument("--path", action="store_true", help="print the script's path instead of its text")
    args = parser.parse_args(argv)
    from ..resources import SLURM, slurm_scripts

    names = slurm_scripts()
    if args.name is None:
        print(SLURM.resolve() if args.path else "\n".join(names))
        return 0
    name = args.name if args.name in names else f"{args.name}.sbatch"
    if name not in names:
        raise MissingInputError(f"no shipped SLURM script {args.name!r} in {SLURM.resolve()}: "
                                f"one of {', '.join(names)}")
    path = SLURM / name
    print(path.resolve() if args.path else path.read_text(), end="\n" if args.path else "")
    return 0
