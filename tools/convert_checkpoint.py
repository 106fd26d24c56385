"""Convert checkpoints: official <-> sfd_scale native, native -> one .safetensors file, DeepSpeed -> native.

    python tools/convert_checkpoint.py official-to-native official.pt --config configs/experiments/sfd_xl.yaml \\
        --out runs/from_official [key=value ...]
    python tools/convert_checkpoint.py native-to-official runs/sfd_xl/checkpoints/step_0400000 --out sfd_xl_ema.pt
    python tools/convert_checkpoint.py native-to-safetensors runs/sfd_xl/checkpoints/step_0400000 \\
        --out ema_bf16.safetensors --which ema --dtype bf16
    python tools/convert_checkpoint.py deepspeed-to-native ds_ckpt_dir --config run.yaml --out runs/from_deepspeed

A native checkpoint serves every TP / PP / DP layout (full tensors under official names, sharded while
loading), so there is no offline resharding step: point ``train.output_dir`` at a converted run directory
(with ``checkpoint.resume=true``) on any layout. Runs on CPU.
"""
import argparse
import sys

from sfd_scale.cli import as_user_errors, entry_point
from sfd_scale.config import load_config


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args, rest = parser.parse_known_args(argv)  # the rest: key=value config overrides
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad or (rest and args.command not in ("official-to-native", "deepspeed-to-native")):
        parser.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    args.overrides = rest

    from sfd_scale.train import convert

    with as_user_errors(ValueError, KeyError, FileNotFoundError):  # weights that do not fit the config
        if args.command == "official-to-native":
            out = convert.official_to_native(args.src, load_config(args.config, args.overrides), args.out, args.step)
        elif args.command == "deepspeed-to-native":
            out = convert.deepspeed_to_native(args.src, load_config(args.config, args.overrides), args.out,
                                              args.tag, args.step)
        elif args.command == "native-to-official":
            out = convert.native_to_official(args.src, args.out)
        else:
            out = convert.native_to_safetensors(args.src, args.out, args.which, args.dtype)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
