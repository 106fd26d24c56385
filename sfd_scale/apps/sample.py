"""Sample a PNG grid from a trained checkpoint.

    sfd sample runs/demo_digits/checkpoints/step_0001500 [--out grid.png] [key=value ...]
    sfd sample runs/sfd_xl/checkpoints/step_0400000 --config experiments/sample_autoguidance \\
        sample.texture_vae=ldm-imagenet256-f16d32-50ep.ckpt
    sfd sample official.pt --config model/sfd_xl --config run.yaml \\
        sample.texture_vae=... sample.latent_stats=/data/latents/latents_stats.pt sample.cfg_scale=1.5

An sfd_scale checkpoint directory brings the run's own config; each --config file, then the overrides, layer on
top. An official checkpoint (its ``ema``) needs --config. Guidance, solver and grid size come from the
``sample`` section; the images are decoded with ``sample.texture_vae`` (latent data) with the latent statistics
the checkpoint carries (an official one: ``data.path`` or ``sample.latent_stats``), else the grid shows a
false-colour view of latent channels. Runs on ``train.device`` (auto: the GPU when one is visible).
"""
import sys
from pathlib import Path

from ..cli import add_progress_flag, as_user_errors, command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd sample", __doc__.split("\n\n")[0], run_config=True)
    parser.add_argument("checkpoint", help="sfd_scale checkpoint directory, or an official .pt / .safetensors")
    parser.add_argument("--config", action="append", default=[], metavar="YAML")
    parser.add_argument("--out", default=None, help="PNG path (default: <checkpoint>/samples.png)")
    add_progress_flag(parser, "a bar of model evaluations")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    import torch
    from tqdm import tqdm

    from ..eval.generate import prepare_sampling, save_sample_grid
    from ..logging import show_progress

    path = Path(args.checkpoint)
    with as_user_errors(ValueError, KeyError, FileNotFoundError):  # a checkpoint that does not fit the config
        run = prepare_sampling(path, args.config, args.overrides)
    if run.decode is None:
        print("note: no decoder (sample.texture_vae is not set): the grid shows a false-colour view of the first "
              "texture latent channels", file=sys.stderr)
    out = args.out or str((path if path.is_dir() else path.parent) / "samples.png")
    torch.manual_seed(run.cfg.sample.seed)
    # the solver's step count is not known ahead (dopri5 adapts it): the bar counts the model's evaluations
    with tqdm(unit="eval", desc="sample", dynamic_ncols=True, disable=not show_progress(args.progress)) as bar:
        hook = run.model.register_forward_hook(lambda *_: bar.update())
        try:
            grid = save_sample_grid(run.model, run.cfg, out, decode=run.decode, guide=run.guide,
                                    num_classes=run.num_classes, device=run.device)
        finally:
            hook.remove()
    print(grid)
    return 0
