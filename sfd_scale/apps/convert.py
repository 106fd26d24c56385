"""Convert checkpoints: official <-> sfd_scale native, native -> one .safetensors file, DeepSpeed -> native.

    sfd convert official-to-native official.pt --config experiments/sfd_xl --out runs/from_official [key=value ...]
    sfd convert native-to-official runs/sfd_xl/checkpoints/step_0400000 --out sfd_xl_ema.pt
    sfd convert native-to-safetensors runs/sfd_xl/checkpoints/step_0400000 --out ema_bf16.safetensors \\
        --which ema --dtype bf16
    sfd convert deepspeed-to-native ds_ckpt_dir --config run.yaml --out runs/from_deepspeed

A native checkpoint serves every TP / PP / DP layout (full tensors under official names, sharded while
loading), so there is no offline resharding step: point ``train.output_dir`` at a converted run directory
(with ``checkpoint.resume=true``) on any layout. Runs on CPU.
"""
import argparse

from ..cli import add_progress_flag, as_user_errors, command_parser, entry_point
from ..config import load_config


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("sfd convert", __doc__.split("\n\n")[0], run_config=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("official-to-native", "official .pt / .safetensors"), ("deepspeed-to-native",
                                                                             "DeepSpeed checkpoint directory")):
        p = sub.add_parser(name, help=f"{what} -> native run directory")
        p.add_argument("src", help=what)
        p.add_argument("--config", action="append", default=[], required=True, metavar="YAML",
                       help="the model's config (checked against the weights)")
        p.add_argument("--out", required=True, help="run directory to write (use as train.output_dir)")
        p.add_argument("--step", type=int, default=0, help="training step the weights stand for")
        if name == "deepspeed-to-native":
            p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    p = sub.add_parser("native-to-official", help="native checkpoint -> official container (model + ema)")
    p.add_argument("src", help="native checkpoint directory (.../checkpoints/step_NNNNNNN)")
    p.add_argument("--out", required=True, help=".pt file to write")
    p = sub.add_parser("native-to-safetensors", help="native checkpoint -> one .safetensors file")
    p.add_argument("src", help="native checkpoint directory (.../checkpoints/step_NNNNNNN)")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--which", choices=("ema", "model"), default="ema")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    for p in sub.choices.values():
        add_progress_flag(p, "a bar through the conversion's steps")
    return parser


@entry_point
def main(argv=None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)  # the rest: key=value config overrides
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad or (rest and args.command not in ("official-to-native", "deepspeed-to-native")):
        parser.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    cfg = load_config(args.config, rest) if args.command.endswith("-to-native") else None  # before torch

    from tqdm import tqdm

    from ..logging import show_progress
    from ..train import convert

    with tqdm(total=convert.STAGES[args.command], desc="convert", dynamic_ncols=True,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]",
              disable=not show_progress(args.progress)) as bar:
        started = []

        def stage(what: str) -> None:  # a step starts: the one before it is done
            bar.update(len(started) > 0)
            started.append(what)
            bar.set_description_str(what)

        with as_user_errors(ValueError, KeyError, FileNotFoundError):  # weights that do not fit the config
            if args.command == "official-to-native":
                out = convert.official_to_native(args.src, cfg, args.out, args.step, stage=stage)
            elif args.command == "deepspeed-to-native":
                out = convert.deepspeed_to_native(args.src, cfg, args.out, args.tag, args.step, stage=stage)
            elif args.command == "native-to-official":
                out = convert.native_to_official(args.src, args.out, stage=stage)
            else:
                out = convert.native_to_safetensors(args.src, args.out, args.which, args.dtype, stage=stage)
        bar.update(bar.total - bar.n)
    print(out)
    return 0
