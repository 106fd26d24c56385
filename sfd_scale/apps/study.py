"""Run a convergence study: train its runs, evaluate FID at the scheduled steps, collect table + plot.

    sfd study studies/digits_cpu --out runs/study_digits_cpu
    sfd study studies/sfd_xl_convergence --out /ckpt/study_xl --launcher slurm
    sfd study STUDY.yaml --out DIR --collect-only        # (re)draw DIR/results.* and the plot
    sfd study STUDY.yaml --out DIR --eval-point RUN STEP  # one point (what the SLURM jobs run)
    sfd study STUDY.yaml --out DIR --set eval.images=10000  # a key of the study file changed

local (default): one process trains each run to each scheduled step in turn, resuming from its checkpoints,
and evaluates that step's EMA weights; rerun the same command after an interruption to continue (finished
points are kept). slurm: submits, per run, train -> eval -> train -> eval ... chained with afterok and a
collect job after all evaluations; prints the job ids (the jobs start in the current directory). Extra key=value
arguments override every run's config (after the study's own overrides). Study file format:
sfd_scale/study.py. Exit status: 0 done, 2 bad study / config / directory, 75 training stopped on a
signal (checkpoint written: run again).
"""
from ..cli import as_user_errors, command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd study", __doc__.split("\n\n")[0], run_config=True)
    parser.add_argument("study", help="study file: a path, or a shipped one by name (studies/digits_cpu)")
    parser.add_argument("--out", required=True, help="study directory (reused to continue)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--collect-only", action="store_true", help="only write results.csv/.md and the plot")
    parser.add_argument("--eval-point", nargs=2, metavar=("RUN", "STEP"), help="evaluate one trained point")
    parser.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch commands, submit nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="study_overrides",
                        help="change a key of the study file itself, e.g. --set eval.images=10000 (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="every run's config, e.g. data.path=...")
    args = parser.parse_intermixed_args(argv)

    from ..study import collect, evaluate_point, load_study, run_local, submit_slurm, summary_text

    with as_user_errors(ValueError, FileNotFoundError):  # StudyError, ConfigError, CheckpointError, ... included
        study = load_study(args.study, args.overrides, args.study_overrides)
        if args.collect_only:
            print(summary_text(study, collect(study, args.out)))
            return 0
        if args.eval_point:
            run, step = args.eval_point[0], int(args.eval_point[1])
            row = evaluate_point(study, args.out, run, step)
            print(f"{run} step {step}: FID {row['fid']:.3f}" if row else "samples of other tasks still missing")
            return 0
        if args.launcher == "slurm":
            jobs = submit_slurm(study, args.out, dry_run=args.dry_run)
            print(f"Study {study.name}: {len(jobs['train'])} training segments and {len(jobs['eval'])} evaluations "
                  f"submitted, collect job {jobs['collect']}; results in {args.out}/results.md. Job ids: "
                  + " ".join(jobs["all"]))
            return 0
        status, result = run_local(study, args.out)
        if result is not None:
            print(summary_text(study, result))
        return status

