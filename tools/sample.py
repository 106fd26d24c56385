"""Sample a PNG grid from a trained checkpoint.

    python tools/sample.py runs/demo_digits/checkpoints/step_0001500 [--out grid.png] [key=value ...]
    python tools/sample.py official.pt --config configs/model/sfd_xl.yaml --config run.yaml sample.cfg_scale=1.5

With an sfd_scale checkpoint directory the run's own config is used (overrides apply on top); an official
checkpoint (its ``ema``) needs ``--config``. Guidance, solver and grid size come from the ``sample`` section.
"""
import argparse
import sys
from pathlib import Path

from sfd_scale.cli import as_user_errors, entry_point


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="sfd_scale checkpoint directory, or an official .pt / .safetensors")
    parser.add_argument("--config", action="append", default=[], metavar="YAML")
    parser.add_argument("--out", default=None, help="PNG path (default: <checkpoint>/samples.png)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    import torch

    from sfd_scale.data.sources import build_training_data
    from sfd_scale.eval.generate import load_guide, load_sampling_model, save_sample_grid

    path = Path(args.checkpoint)
    with as_user_errors(ValueError, KeyError, FileNotFoundError):  # a checkpoint that does not fit the config
        model, cfg = load_sampling_model(path, args.config, args.overrides)
    guide = load_guide(cfg) if cfg.sample.guidance == "autoguidance" else None
    decode = num_classes = None
    if cfg.data.source == "demo":  # the demo's fixed encoders are rebuilt from the seed: decode to pixels
        data = build_training_data(cfg)
        decode, num_classes = data.decode, data.num_classes
    out = args.out or str((path if path.is_dir() else path.parent) / "samples.png")
    torch.manual_seed(cfg.sample.seed)
    print(save_sample_grid(model, cfg, out, decode=decode, guide=guide, num_classes=num_classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
