"""Sample a PNG grid from a trained checkpoint.

    python tools/sample.py runs/demo_digits/checkpoints/step_0001500 [--out grid.png] [key=value ...]
    python tools/sample.py runs/sfd_xl/checkpoints/step_0400000 --config configs/experiments/sample_autoguidance.yaml \
        sample.texture_vae=ldm-imagenet256-f16d32-50ep.ckpt
    python tools/sample.py official.pt --config configs/model/sfd_xl.yaml --config run.yaml \
        sample.texture_vae=... sample.latent_stats=/data/latents/latents_stats.pt sample.cfg_scale=1.5

An sfd_scale checkpoint directory brings the run's own config; each --config file, then the overrides, layer on
top. An official checkpoint (its ``ema``) needs --config. Guidance, solver and grid size come from the
``sample`` section; the images are decoded with ``sample.texture_vae`` (latent data) with the latent statistics
the checkpoint carries (an official one: ``data.path`` or ``sample.latent_stats``), else the grid shows a
false-colour view of latent channels. Runs on ``train.device`` (auto: the GPU when one is visible).
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

    from sfd_scale.eval.generate import prepare_sampling, save_sample_grid

    path = Path(args.checkpoint)
    with as_user_errors(ValueError, KeyError, FileNotFoundError):  # a checkpoint that does not fit the config
        run = prepare_sampling(path, args.config, args.overrides)
    if run.decode is None:
        print("note: no decoder (sample.texture_vae is not set): the grid shows a false-colour view of the first "
              "texture latent channels", file=sys.stderr)
    out = args.out or str((path if path.is_dir() else path.parent) / "samples.png")
    torch.manual_seed(run.cfg.sample.seed)
    print(save_sample_grid(run.model, run.cfg, out, decode=run.decode, guide=run.guide, num_classes=run.num_classes,
                           device=run.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
