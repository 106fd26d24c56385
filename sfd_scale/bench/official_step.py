"""The real baseline: the OFFICIAL SFD training step, imported from the official code at a path, timed next to
ours on the same model, batch, device and precision (``sfd bench --official-code DIR``).

The official code (github.com/yuemingPAN/SFD, MIT) is never copied into sfd_scale: ``import_official`` puts
its directory on ``sys.path`` in the process that times it and imports only what its model and transport
need (``models.lightningdit``, ``transport``; not train.py, which wants DDP, accelerate and its dataset).
``official_step_times`` then runs what train.py's loop does per step, in one process:

  ``transport.training_losses(model, x, dict(y=y), use_repa, feature_dino)``, the loss terms summed as train.py
  sums them, ``opt.zero_grad()``, backward, (``clip_grad_norm_`` when our config clips: train.py does when its
  config has ``max_grad_norm``), ``opt.step()`` with ``torch.optim.AdamW(weight_decay=0, betas)``, train.py's
  ``update_ema`` (a name -> parameter dict of both models built every step, then ``mul_`` / ``add_`` per
  parameter) and the ``.item()`` of the logged loss every step.

The model keeps its own ``@torch.compile`` wrappers (blocks, final layer, embedders, modulate): they compile
on the first call unless compilation is disabled in that process (``TORCH_COMPILE_DISABLE=1``: eager).
Under bf16 the model's forward runs in autocast with its outputs cast back to fp32, as accelerate does
for ``mixed_precision='bf16'``. The network starts from OUR initial weights (``export_official_state_dict``
of the model the trainer builds from ``train.seed``): both sides train the same network.

Every measurement of a paired comparison (``paired``) runs in a fresh Python process with the same thread
count, warm-up and step count, ours and theirs alternating, so compiled caches, thread pools and allocator
state never leak from one into the other. ``python -m sfd_scale.bench.official_step JSON`` is that process.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from copy import deepcopy
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..config import Config, load_config, model_args, objective_config, sfd_spec
from ..diffusion.official import official_transport_kwargs
from ..models.official import export_official_state_dict, official_kwargs
from .timing_inputs import sync, synthetic_batch


# ----------------------------------------------------------------------------------------------- import
def import_official(code_dir: str | os.PathLike):
    """(official ``models.lightningdit`` module, ``transport`` package) imported from ``code_dir``.

    Their top-level names (``models``, ``transport``) are generic: a module of that name imported from
    anywhere else (an installed package, an earlier import) is refused by name rather than silently used."""
    code_dir = Path(code_dir).resolve()
    if not (code_dir / "models" / "lightningdit.py").is_file() or not (code_dir / "transport").is_dir():
        raise FileNotFoundError(f"{code_dir} does not look like the official SFD code (models/lightningdit.py, "
                                "transport/)")
    sys.path.insert(0, str(code_dir))
    try:
        import importlib

        lightningdit = importlib.import_module("models.lightningdit")
        transport = importlib.import_module("transport")
    finally:
        sys.path.remove(str(code_dir))
    for module in (lightningdit, transport):
        where = Path(module.__file__).resolve()
        if code_dir not in where.parents:
            raise ImportError(f"module {module.__name__!r} was imported from {where}, not from the official code "
                              f"in {code_dir}: another package of that name is in the way")
    return lightningdit, transport


def official_update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """train.py's EMA semantics: name -> parameter dicts built per call, then ``mul_`` / ``add_`` parameter by
    parameter (no foreach, no fused kernel)."""
    ema_params = OrderedDict(ema_model.named_parameters())
    with torch.no_grad():
        for name, param in OrderedDict(model.named_parameters()).items():
            ema_params[name.replace("module.", "")].mul_(decay).add_(param.data, alpha=1 - decay)


def _our_initial_weights(cfg: Config) -> dict:
    """The weights the trainer starts from (it seeds with ``train.seed`` before building the model)."""
    from ..models.lightningdit import LightningDiT
    from ..parallel.layout import ensure_initialized

    ensure_initialized()
    torch.manual_seed(cfg.train.seed)
    return export_official_state_dict(LightningDiT(model_args(cfg)))


def _autocast_forward(model: torch.nn.Module, device: torch.device):
    """accelerate's ``mixed_precision='bf16'``: the forward under autocast, floating outputs back in fp32."""
    forward = model.forward

    def wrapped(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if o.is_floating_point() else o for o in out)
        return out.float()

    model.forward = wrapped


# ----------------------------------------------------------------------------------------------- timing
def official_step_times(cfg: Config, code_dir: str, steps: int, warmup: int) -> dict:
    """Seconds of each timed official training step (module docstring), global batch, one process."""

    lightningdit, transport_pkg = import_official(code_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    args, spec = model_args(cfg), sfd_spec(cfg)
    initial = _our_initial_weights(cfg)
    model = lightningdit.LightningDiT(**official_kwargs(args, spec, cfg.train.activation_checkpointing))
    model.load_state_dict(initial, strict=True)
    ema = deepcopy(model).to(device).requires_grad_(False).eval()
    model = model.to(device).train()
    if cfg.train.precision == "bf16":
        _autocast_forward(model, device)
    transport = transport_pkg.create_transport(**official_transport_kwargs(objective_config(cfg), spec.semantic_chans,
                                                                           spec.delta_t))
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=0, betas=(o.beta1, o.beta2))
    batch = synthetic_batch(cfg, cfg.train.global_batch_size)
    x, y = batch["latent"].to(device), batch["label"].to(device)
    feature_dino = None
    if args.use_repa:  # the official loader's layout: (B, C, h, w)
        repa = batch["repa"]
        feature_dino = repa.transpose(1, 2).reshape(repa.shape[0], repa.shape[2], args.grid, args.grid).to(device)
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        terms = transport.training_losses(model, x, dict(y=y), use_repa=args.use_repa, feature_dino=feature_dino)
        mse = terms["loss"].mean()
        loss = mse + sum(terms[k].mean() for k in ("cos_loss", "repa_loss") if k in terms)
        opt.zero_grad()
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        official_update_ema(ema, model, cfg.train.ema_decay)
        losses.append(mse.item())  # train.py logs the MSE term, one .item() per step
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": times, "loss_first": losses[0], "loss_last": losses[-1], "device": str(device)}


def our_step_times(cfg: Config, steps: int, warmup: int) -> dict:
    """Seconds of each timed ``Trainer.train_step`` of ours (one process, synthetic batch reused)."""
    from ..train.trainer import Trainer

    trainer = Trainer(cfg)
    batch = synthetic_batch(cfg, cfg.train.global_batch_size)
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step(batch)
        sync(trainer.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(metrics.get("loss"))
    trainer.data.close()
    loss = [float(v) if v is not None else None for v in (losses[0], losses[-1])]
    return {"step_s": times, "loss_first": loss[0], "loss_last": loss[1], "device": str(trainer.device)}


# ----------------------------------------------------------------------------------------------- processes
def run_isolated(which: str, config_files: Sequence[str], overrides: Sequence[str], steps: int, warmup: int,
                 threads: int, compiled: bool, code_dir: Optional[str] = None, timeout: float = 1800.0) -> dict:
    """One measurement (``which`` = 'ours' | 'official') in a fresh Python process with ``threads`` threads;
    ``compiled=False`` also sets ``TORCH_COMPILE_DISABLE=1`` there (the official model's wrappers run eager)."""
    job = {"which": which, "config": list(config_files), "overrides": list(overrides), "steps": steps,
           "warmup": warmup, "threads": threads, "compiled": compiled, "code_dir": code_dir}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("TORCH_COMPILE_DISABLE", None)
    if not compiled:
        env["TORCH_COMPILE_DISABLE"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "sfd_scale.bench.official_step", json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} step timing failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def paired(config_files: Sequence[str], overrides: Sequence[str], code_dir: str, pairs: int, steps: int, warmup: int,
           threads: int, compiled: bool, report=print) -> dict:
    """``pairs`` x (ours, official), alternating, each in a fresh process under the same conditions: per-pair
    medians of the timed steps, their medians, and the median of the per-pair ratios ours / official."""
    engine = [o for o in overrides if o.startswith("parallel.engine=")] or ["parallel.engine=plain"]
    ours_overrides = list(overrides) + engine[-1:] + [f"train.compile={str(compiled).lower()}"]
    rows = []
    for k in range(pairs):
        row = {}
        for which in (("ours", "official") if k % 2 == 0 else ("official", "ours")):  # neither always goes first
            result = run_isolated(which, config_files, ours_overrides, steps, warmup, threads, compiled, code_dir)
            row[which] = statistics.median(result["step_s"])
            row[f"{which}_min"] = min(result["step_s"])  # the least disturbed step, on a shared machine
            row[f"{which}_loss_first"] = result["loss_first"]
        row["ratio"] = row["ours"] / row["official"]
        row["ratio_min"] = row["ours_min"] / row["official_min"]
        report(f"pair {k + 1}/{pairs} ({'compiled' if compiled else 'eager'}): ours {1000 * row['ours']:.2f} ms, "
               f"official {1000 * row['official']:.2f} ms, ours/official {row['ratio']:.3f}")
        rows.append(row)
    return {"mode": "compiled" if compiled else "eager", "pairs": rows,
            "ours_median_ms": 1000 * statistics.median(r["ours"] for r in rows),
            "official_median_ms": 1000 * statistics.median(r["official"] for r in rows),
            "ratio_median": statistics.median(r["ratio"] for r in rows),
            "ratio_of_min_median": statistics.median(r["ratio_min"] for r in rows)}


def paired_markdown(results: List[dict], header: str) -> str:
    """The results file of ``paired`` runs: medians, median ratio, and every pair."""
    lines = [header, "", "| mode | ours median ms / step | official median ms / step "
             "| median of per-pair ours / official | ours <= official | median of per-pair ratio of fastest steps |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['ours_median_ms']:.2f} | {r['official_median_ms']:.2f} | "
                     f"{r['ratio_median']:.3f} | {'yes' if r['ratio_median'] <= 1 else 'NO'} | "
                     f"{_fmt(r.get('ratio_of_min_median'))} |")
    lines += ["", "Per pair (median / fastest step of each process, ms):", "",
              "| mode | pair | ours | official | ratio | ours fastest | official fastest |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        for k, p in enumerate(r["pairs"]):
            lines.append(f"| {r['mode']} | {k + 1} | {1000 * p['ours']:.2f} | {1000 * p['official']:.2f} | "
                         f"{p['ratio']:.3f} | {_fmt(p.get('ours_min'), 1000)} | {_fmt(p.get('official_min'), 1000)} |")
    return "\n".join(lines) + "\n"


def _fmt(value, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.3f}"


def _worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    cfg = load_config(job["config"], job["overrides"])
    if job["which"] == "official":
        if not job["code_dir"]:
            raise ValueError("the official step needs the official code's directory")
        return official_step_times(cfg, job["code_dir"], job["steps"], job["warmup"])
    return our_step_times(cfg, job["steps"], job["warmup"])


if __name__ == "__main__":
    result = _worker(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps({**result, "threads": torch.get_num_threads()}), flush=True)
