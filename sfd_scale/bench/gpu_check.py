"""The checks of the GPU check of issue #14 (``bash tools/gpu_check.sh`` in a checkout, ``sfd gpu-check``): on one
H100 in <= 8 minutes the command writes ``benchmarks/RESULTS.md`` (+ JSON) with

  1. golden parity on the device in fp32 (TF32 off): the golden forward (eval + train with the REPA
     projection) and every loss term, max |ours - golden| / max |golden| <= ``GOLDEN_RTOL`` (1e-5: the
     CPU tests ask for bitwise-level agreement, GPU kernels sum in another order);
  2. bf16 vs fp32 loss on the same batch and draws (relative difference of the total <= ``BF16_RTOL``);
  3. attention: flash-attn (when importable) and SDPA against an fp32 math reference, bf16 inputs;
  4. the SFD-XXL sweep (``configs/bench/h100_xxl.yaml``, micro-batch 32/64/128 x activation checkpointing
     off/on, compile on): images/s, MFU, peak memory (``sfd_scale/bench/throughput.py``);
  5. the official training step of the same model in the same run (``--official-code``), compiled;
  6. the async-checkpoint stall (time training is blocked) for the full XXL training state;
  7. the cost model's prediction error: ``sfd cost-model --device meta`` (fixed constants) vs the
     measured step at micro-batch 64, compiled;
  8. the device-side keyed draws on CUDA equal those on the CPU (``diffusion/keyed_noise.py``).

``--cpu-smoke`` runs every step that can run on a CPU at tiny sizes in about a minute (the test suite runs
it). A step that fails is reported in the file and makes the exit status 1; the others still run. The golden
parity step reads the golden set with a checkout's ``tests/golden.py``: it runs where ``sfd_scale`` is imported
from a checkout (as ``tools/gpu_check.sh`` does), and reports itself failed elsewhere.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# the checkout this package is imported from, if it is one: its tests/golden.py reads the golden set
CHECKOUT = Path(__file__).resolve().parents[2]
GOLDEN_RTOL = 1e-5  # relative to the largest golden magnitude; fp32, TF32 off
BF16_RTOL = 2e-2    # bf16 autocast vs fp32, total loss of one batch
ATTN_ATOL = 2e-2    # bf16 attention output (values O(1)) vs the fp32 math reference


# ----------------------------------------------------------------------------------------------- checks
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def golden_parity(device: torch.device, golden_dir: Path) -> dict:
    """Forward and loss terms of the golden set on ``device`` in fp32 (``tests/golden.py``'s loaders)."""
    from ..diffusion.official import objective_from_official
    from ..diffusion.sfd import SFDObjective

    if not (CHECKOUT / "tests" / "golden.py").is_file():
        raise RuntimeError(f"golden parity reads the golden set with a checkout's tests/golden.py, and sfd_scale is "
                           f"not imported from a checkout ({CHECKOUT}): run tools/gpu_check.sh in one")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    from tests import golden

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    entry = golden.config(golden_dir)["models"]["main"]
    model, spec = golden.build(golden_dir)
    model = model.to(device)
    to = lambda g: {k: v.to(device) for k, v in g.items()}  # noqa: E731
    g = to(golden.tensors(golden_dir, entry["forward_file"]))
    errors = {}
    with torch.no_grad():
        errors["forward_eval"] = _rel(model(g["x"], golden.model_time(spec, g), g["y"]), g["out_eval"])
        model.train()
        model.y_embedder.dropout_prob = 0.0  # as the golden run
        out = model(g["x"], golden.model_time(spec, g), g["y"])
        velocity = out[0] if isinstance(out, tuple) else out
        errors["forward_train"] = _rel(velocity, g["out_eval"])
        if "repa_proj_train_subset" in g:
            errors["repa_projection"] = _rel(out[1][:, g["repa_token_index"]], g["repa_proj_train_subset"])
        lg = to(golden.tensors(golden_dir, entry["loss_file"]))
        objective = SFDObjective(spec, objective_from_official(**entry["loss"]["transport"]))
        repa = lg["feature_dino_fp16"].float() if "feature_dino_fp16" in lg else None
        terms = objective.loss_terms(model, lg["x1"], lg["y"], t_base=lg["t_base"], x0=lg["x0"], repa_target=repa)
    for key in ("xt", "ut", "pred", "loss", "cos_loss", "repa_loss"):
        if key in lg and key in terms:
            errors[f"loss_{key}"] = _rel(terms[key], lg[key])
    errors["loss_total"] = _rel(terms["total"], lg["total_loss"])
    worst = max(errors.values())
    return {"ok": worst <= GOLDEN_RTOL, "tolerance_rel": GOLDEN_RTOL, "max_rel_error": worst, "errors": errors}


def bf16_vs_fp32(device: torch.device, config: list, overrides: list, batch: int) -> dict:
    """Total loss of one batch with the same draws in fp32 and under bf16 autocast."""
    from ..config import load_config, model_args, objective_config, sfd_spec
    from ..diffusion.sfd import SFDObjective
    from ..models.lightningdit import LightningDiT
    from ..parallel.layout import ensure_initialized
    from .timing_inputs import synthetic_batch

    ensure_initialized()
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = LightningDiT(model_args(cfg)).to(device).train()
    model.y_embedder.dropout_prob = 0.0
    with torch.no_grad():  # off the zero-initialised output layers: an all-zero prediction is not a test
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    objective = SFDObjective(sfd_spec(cfg), objective_config(cfg))
    b = {k: v.to(device) for k, v in synthetic_batch(cfg, batch).items()}
    g = torch.Generator().manual_seed(1)
    t_base, x0 = torch.rand(batch, generator=g).to(device), torch.randn(b["latent"].shape, generator=g).to(device)
    totals = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            totals[name] = objective.loss_terms(model, b["latent"], b["label"], t_base=t_base, x0=x0,
                                                repa_target=b.get("repa"))["total"].float().item()
    rel = abs(totals["bf16"] - totals["fp32"]) / abs(totals["fp32"])
    return {"ok": rel <= BF16_RTOL, "tolerance_rel": BF16_RTOL, "rel_diff": rel, **totals}


def attention_agreement(device: torch.device, shape=(4, 24, 256, 64)) -> dict:
    """flash-attn (if importable) and SDPA in bf16 against softmax(q k^T / sqrt(d)) v in fp32."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    reference = torch.softmax(q @ k.transpose(-2, -1) / shape[-1] ** 0.5, dim=-1) @ v
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out = {"sdpa_max_abs": (F.scaled_dot_product_attention(qb, kb, vb).float() - reference).abs().max().item()}
    try:
        from flash_attn import flash_attn_func  # (B, N, H, D) layout
        flash = flash_attn_func(*(t.transpose(1, 2) for t in (qb, kb, vb))).transpose(1, 2)
        out["flash_attn_max_abs"] = (flash.float() - reference).abs().max().item()
        out["flash_vs_sdpa_max_abs"] = (flash.float()
                                        - F.scaled_dot_product_attention(qb, kb, vb).float()).abs().max().item()
    except ImportError as err:
        out["flash_attn"] = f"not importable ({err})"
    from ..models.layers import attention_backend
    out["backend"] = attention_backend(device, torch.bfloat16)
    out["ok"] = all(v <= ATTN_ATOL for k, v in out.items() if k.endswith("_max_abs"))
    out["tolerance_abs"] = ATTN_ATOL
    return out


def keyed_draws_on_device(device: torch.device) -> dict:
    """The trainer's keyed draws on ``device`` equal those on the CPU: integers bitwise, floats to 1e-6."""
    from ..diffusion import keyed_noise

    index = torch.arange(1000, 1256)
    cpu = keyed_noise.keyed_draws(7, 3, index, (48, 16, 16), lognorm=True, dropout=0.1)
    dev = keyed_noise.keyed_draws(7, 3, index.to(device), (48, 16, 16), lognorm=True, dropout=0.1)
    keys_equal = torch.equal(keyed_noise.sample_keys(7, 3, index),
                             keyed_noise.sample_keys(7, 3, index.to(device)).cpu())
    errors = {name: (a.double() - b.cpu().double()).abs().max().item()
              for name, a, b in zip(("t_base", "x0", "drop"), cpu, dev)}
    return {"ok": keys_equal and errors["drop"] == 0 and max(errors.values()) <= 1e-6, "keys_equal": keys_equal,
            "max_abs": errors}


def sweep(config: list, overrides: list, micro_batches: list, checkpointing: list, steps: int, warmup: int,
          compile_on: bool, checkpoint_dir: str) -> list:
    """One row per (micro-batch, activation checkpointing); the first also times two full-state saves."""
    from .throughput import Setting, benchmark

    rows = []
    for i, (mb, ac) in enumerate((mb, ac) for mb in micro_batches for ac in checkpointing):
        extra = [f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}",
                 f"train.activation_checkpointing={str(ac).lower()}", f"train.compile={str(compile_on).lower()}",
                 f"train.output_dir={checkpoint_dir}", "checkpoint.keep_last=1"]
        try:
            rows += benchmark([Setting(f"micro-batch {mb}, AC {'on' if ac else 'off'}", 1, extra)], config,
                              overrides, steps, warmup, official=False, checkpoint=i == 0)
        except Exception as err:  # an OOM of one setting is a result, not the end of the check
            rows.append({"setting": f"micro-batch {mb}, AC {'on' if ac else 'off'}", "error": _last_line(err)})
    return rows


def official_step(config: list, overrides: list, code_dir: str, mb: int, steps: int, warmup: int,
                  compile_on: bool) -> dict:
    from .official_step import run_isolated

    result = run_isolated("official", config, overrides + [f"train.global_batch_size={mb}"], steps, warmup,
                          torch.get_num_threads(), compile_on, code_dir)
    step_s = sum(result["step_s"]) / len(result["step_s"])
    return {"ok": True, "micro_batch": mb, "compiled": compile_on, "step_ms": 1000 * step_s,
            "images_per_s": mb / step_s}


def cost_model_error(config: list, overrides: list, measured_ms: float, mb: int, compiled: bool) -> dict:
    """The cost model's predicted H100 step (``sfd cost-model``: counted on meta, fixed constants; a process of its
    own) vs the step measured here at the same config and micro-batch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cost.json"
        cmd = [sys.executable, "-m", "sfd_scale", "cost-model", *sum((["--config", c] for c in config), []),
               "--device", "meta", "--micro-batch", str(mb), "--json", str(out), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        run = next(iter(json.loads(out.read_text())["runs"].values()))
    prediction = run["prediction"]["compiled" if compiled and "compiled" in run["prediction"] else "eager"]
    predicted = 1000 * prediction["step_s"]
    return {"ok": True, "predicted_ms": predicted, "predicted_mfu": prediction["mfu"], "measured_ms": measured_ms,
            "error_rel": (predicted - measured_ms) / measured_ms}


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


# ----------------------------------------------------------------------------------------------- plan
GPU_PLAN = dict(config=["bench/h100_xxl"], overrides=[], micro_batches=[32, 64, 128],
                activation_checkpointing=[False, True], steps=10, warmup=5, compile=True, bf16_batch=8, official_mb=64)
SMOKE_PLAN = dict(config=["bench/cpu_small"],
                  overrides=["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "data.source=synthetic",
                             "train.device=cpu"],
                  micro_batches=[2], activation_checkpointing=[False], steps=2, warmup=1, compile=False, bf16_batch=2,
                  official_mb=2)  # AC on is the same code path (and tests/bench/test_throughput.py runs it)


def run_checks(plan: dict, device: torch.device, golden_dir: Path, official_code: str | None) -> dict:
    """Every step of the module docstring; each one's result or its error."""
    results, config, overrides = {}, plan["config"], plan["overrides"]

    def step(name, fn, *args):
        started = time.perf_counter()
        try:
            results[name] = fn(*args)
        except Exception as err:
            results[name] = {"ok": False, "error": _last_line(err), "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[gpu_check] {name}: {'ok' if results[name].get('ok') is not False else 'FAILED'} "
              f"({results[name]['seconds']} s)", flush=True)

    step("golden_parity_fp32", golden_parity, device, golden_dir)
    step("bf16_vs_fp32_loss", bf16_vs_fp32, device, config, overrides, plan["bf16_batch"])
    step("attention", attention_agreement, device)
    step("keyed_draws", keyed_draws_on_device, device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as out_dir:
        step("sweep", lambda: {"rows": sweep(config, overrides, plan["micro_batches"], plan["activation_checkpointing"],
                                             plan["steps"], plan["warmup"], plan["compile"], out_dir)})
    rows = results["sweep"].get("rows", [])
    results["sweep"]["ok"] = bool(rows) and all("error" not in r for r in rows)
    ours = next((r for r in rows if r.get("micro_batch") == plan["official_mb"] and not r["activation_checkpointing"]
                 and "error" not in r), None)
    if official_code:
        step("official_step", official_step, config, overrides, official_code, plan["official_mb"], plan["steps"],
             plan["warmup"], plan["compile"])
        if ours is not None and "step_ms" in results["official_step"]:
            results["official_step"]["ours_step_ms"] = ours["step_ms"]
            results["official_step"]["ours_over_official"] = ours["step_ms"] / results["official_step"]["step_ms"]
    else:
        results["official_step"] = {"ok": False, "error": "no --official-code DIR given"}
    saves = next((r for r in rows if "save_blocking_s" in r), None)
    results["checkpoint_stall"] = ({"ok": True, "blocking_s": saves["save_blocking_s"],
                                    "until_published_s": saves["save_until_published_s"],
                                    "checkpointer": saves["save_checkpointer"], "setting": saves["setting"]}
                                   if saves else {"ok": False, "error": "the sweep's first setting did not run"})
    if ours is not None:
        step("cost_model", cost_model_error, config, overrides, ours["step_ms"], plan["official_mb"], plan["compile"])
    else:
        results["cost_model"] = {"ok": False, "error": "no measured step to compare with"}
    return results


def markdown(results: dict, header: str) -> str:
    from .throughput import markdown as sweep_table

    lines = [header, ""]
    for name, r in results.items():
        state = "ok" if r.get("ok") else ("n/a" if r.get("ok") is None else "FAILED")
        lines.append(f"## {name}: {state} ({r.get('seconds', 0)} s)")
        lines.append("")
        if "error" in r:
            lines += [f"Error: `{r['error']}`", ""]
        if name == "sweep" and r.get("rows"):
            good = [row for row in r["rows"] if "error" not in row]
            lines.append(sweep_table(good, "").strip() if good else "")
            lines += [f"- {row['setting']}: `{row['error']}`" for row in r["rows"] if "error" in row]
            lines.append("")
            continue
        shown = {k: v for k, v in r.items() if k not in ("ok", "seconds", "error", "traceback", "rows")}
        lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in shown.items()]
        lines.append("")
    return "\n".join(lines)
