"""The ``sfd`` command (setup.py's console script; also ``python -m sfd_scale``): one subcommand per task, each a
module of this package holding that command's ``main(argv)``. ``tools/*.py`` are shims over the same modules,
so ``python tools/train.py`` in a checkout is ``sfd train``.

Every subcommand reports a problem the user can fix as one ``error: ...`` line with exit status 2
(``cli.entry_point``; ``--debug`` or ``SFD_DEBUG=1`` shows the traceback), parses its arguments and validates its
config before importing torch, megatron-core or DeepSpeed, and lists its options with ``--help``. This module
imports nothing of the package but the one subcommand it runs, so ``sfd --help`` is instant.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import Optional, Sequence

# name -> (module under sfd_scale, what it does); the order of ``sfd --help``
COMMANDS = {
    "train": ("apps.train", "train an SFD model (one process, or the ranks of torchrun / srun)"),
    "sample": ("apps.sample", "a PNG grid of samples from a checkpoint"),
    "sample-fid": ("apps.sample_fid", "class-balanced samples for FID: resumable, split over ranks"),
    "fid": ("apps.fid", "ADM's FID, sFID, IS, precision, recall of a sample batch"),
    "fid50k": ("apps.fid50k", "FID-50K in one command: sampling on every rank, scoring on rank 0"),
    "extract": ("apps.extract", "image folder -> latent shards (texture + semantic latents, DINOv2 features)"),
    "import-latents": ("apps.import_latents", "the official SFD latent folder -> latent shards, value-exact"),
    "verify-shards": ("apps.verify_shards", "check every shard file of a latent dataset"),
    "semvae": ("apps.semvae", "train the Semantic VAE"),
    "convert": ("apps.convert", "checkpoints: official <-> native, native -> safetensors, DeepSpeed -> native"),
    "study": ("apps.study", "a convergence study: train its runs, evaluate FID, table, plot, speed-ups"),
    "plot": ("apps.plot", "a run's loss and FID plots (PNG) from its metrics.jsonl"),
    "summary": ("apps.summary", "architecture and parameter counts of a model"),
    "plan": ("apps.plan", "per-GPU memory of every TP x PP x DP layout of a model"),
    "bench": ("apps.bench", "training throughput: images/s, MFU, memory, the official step beside ours"),
    "bench-loader": ("apps.bench_loader", "latent loader throughput against a one-file-per-sample reader"),
    "bench-online-repa": ("apps.bench_online_repa", "online vs stored REPA targets: bytes, loader, GPU time"),
    "cost-model": ("apps.cost_model", "predicted H100 training step from counts taken on CPU"),
    "gpu-check": ("apps.gpu_check", "the GPU check in one command (a checkout's tools/gpu_check.sh drives it)"),
    "torchrun": ("torchrun", "torchrun that keeps the workers' exit status 75 (requeue) / 2 (error)"),
    "configs": ("apps.configs", "list the shipped configs, or print one"),
    "slurm-script": ("apps.slurm_script", "print a shipped sbatch script, or where it is"),
}
DEBUG_FLAG = "--debug"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sfd [--debug] COMMAND [arguments]   (sfd COMMAND --help: its arguments)", "",
             "Train and evaluate Semantic-First Diffusion at scale.", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "--config takes a path or a shipped config by name: sfd train --config demo/digits",
              f"{DEBUG_FLAG} (or SFD_DEBUG=1): show the traceback of an error; --version: the package version"]
    return "\n".join(lines)


def command_main(name: str):
    """The ``main(argv)`` of subcommand ``name`` (its module imported now, not before)."""
    return importlib.import_module(f"sfd_scale.{COMMANDS[name][0]}").main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sfd [--debug] COMMAND ARGS...``: the subcommand's exit status; 2 and one line for an unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = []
    while argv and argv[0].startswith("-"):
        flags.append(argv.pop(0))
    if "--version" in flags:
        from sfd_scale import __version__
        print(f"sfd (sfd_scale) {__version__}")
        return 0
    if {"-h", "--help"} & set(flags) or argv[:1] == ["help"] and len(argv) == 1:
        print(usage())
        return 0
    if argv[:1] == ["help"]:  # sfd help COMMAND = sfd COMMAND --help
        argv = [argv[1], "--help"]
    bad = [f for f in flags if f != DEBUG_FLAG]
    if bad or not argv or argv[0] not in COMMANDS:
        given = bad[0] if bad else argv[0] if argv else None
        close = difflib.get_close_matches(given or "", COMMANDS, n=1)
        what = "a command is needed" if given is None else f"unknown {'option' if bad else 'command'} {given!r}"
        hint = f"; did you mean {close[0]!r}?" if close and not bad else ""
        print(f"error: sfd: {what}{hint} (sfd --help lists the commands)", file=sys.stderr)
        return 2
    return command_main(argv[0])(argv[1:] + ([DEBUG_FLAG] if DEBUG_FLAG in flags else []))
