"""Data-parallel engines: DP = 2 equals DP = 1 at the same global batch, exact resume, accumulation.

A tiny LightningDiT/SFD (hidden 32, depth 2, heads 2, 16x16 latents of 4 + 2 channels, no label dropout)
is built from the same seed on every rank; every sample's base time and noise are pinned from a fixed
generator, so a DP = 2 run sees exactly the global batches of a DP = 1 run, split over the ranks.
Tolerances: DP = 2 sums the gradients of two half-batches instead of one batch (fp32 rounding, ~1e-8 on
the gradients); after 3 AdamW steps the parameters agree to ``ATOL`` (max abs difference). Resume and
the engines' own arithmetic are compared bit for bit.
"""
from __future__ import annotations

import contextlib
import io
import time

import pytest
import torch

from sfd_scale.config import ConfigError, config_from_dict, model_args, objective_config, sfd_spec
from sfd_scale.diffusion.micro_batch import MicroBatch
from sfd_scale.diffusion.sfd import SFDObjective
from sfd_scale.models.lightningdit import LightningDiT
from sfd_scale.parallel.engines import build_engine
from sfd_scale.parallel.engines.base import local_micro_batches, micro_batch_layout
from sfd_scale.parallel.engines.plain import PlainEngine
from tests.dist.harness import run_ranks

STEPS, GLOBAL, RESUME_AT = 3, 8, 2
ATOL = 3e-7  # observed on this machine: 3e-8 (megatron DP2 vs DP1), 1.2e-7 (ZeRO vs plain, ~1 ulp at |w|~1)


# ----------------------------------------------------------------------------------------------- fixtures
def tiny_config(*overrides: str):
    return config_from_dict({}, [
        "model.name=LightningDiT-S/1", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
        "model.num_classes=10", "model.class_dropout_prob=0.0", "sfd.texture_chans=4", "sfd.semantic_chans=2",
        "data.source=demo", "train.device=cpu", f"train.global_batch_size={GLOBAL}", "optim.lr=1e-3",
        "optim.warmup_steps=2", "optim.grad_clip=0.5", "optim.weight_decay=0.01", *overrides])


def global_batches(steps: int = STEPS):
    """One MicroBatch per step: the whole global batch, its draw pinned."""
    g = torch.Generator().manual_seed(1234)
    return [MicroBatch(x1=torch.randn(GLOBAL, 6, 16, 16, generator=g), y=torch.randint(0, 10, (GLOBAL,), generator=g),
                       t_base=torch.rand(GLOBAL, generator=g), x0=torch.randn(GLOBAL, 6, 16, 16, generator=g))
            for _ in range(steps)]


def objective_for(cfg):
    return SFDObjective(sfd_spec(cfg), objective_config(cfg))


def new_model(cfg, weights=None):
    torch.manual_seed(cfg.train.seed)
    model = LightningDiT(model_args(cfg))
    if weights is not None:
        model.load_state_dict(weights)
    return model


def train(engine, cfg, batches):
    """Metrics per step, read on the host here (engines return device tensors)."""
    objective = objective_for(cfg)
    out = []
    for b in batches:
        micro = local_micro_batches(b, engine.micro_batch_size, engine.dp_rank, engine.dp_size)
        m = engine.train_step(micro, objective)
        out.append({k: v.item() if torch.is_tensor(v) else v for k, v in m.items() if k != "terms"}
                   | {"terms": {k: v.item() for k, v in m["terms"].items()}})
    return out


LOGGED = ["loss_texture", "loss_semantic", "loss_cos"]  # tiny_config: SFD channels, cosine loss, no REPA


def check_terms(metrics: dict, reference: dict, rel: float) -> None:
    """The engine logs every loss term, the same mean over micro-batches and DP ranks as ``loss`` (they add
    up to it: ``SFDObjective.term_means``) and equal to the reference layout's."""
    terms, w = metrics["terms"], objective_config(tiny_config()).semantic_weight
    assert list(terms) == LOGGED, terms
    mse = (4 * terms["loss_texture"] + w * 2 * terms["loss_semantic"]) / 6
    assert metrics["loss"] == pytest.approx(mse + terms["loss_cos"], rel=1e-5)
    assert terms == pytest.approx(reference["terms"], rel=rel)


def weights(engine):
    with engine.full_parameters() as module:
        return {k: v.detach().float().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def run(cfg, batches=None, engine_cls=None):
    engine = (engine_cls or build_engine)(new_model(cfg), cfg)
    metrics = train(engine, cfg, global_batches() if batches is None else batches)
    return weights(engine), metrics


def resumed(cfg, at: int = RESUME_AT):
    """Train ``at`` steps, checkpoint (torch.save / weights_only load), continue in fresh engines."""
    batches = global_batches()
    engine = build_engine(new_model(cfg), cfg)
    train(engine, cfg, batches[:at])
    buf = io.BytesIO()
    torch.save({"weights": weights(engine), "engine": engine.state_dict()}, buf)
    del engine
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    engine = build_engine(new_model(cfg, ckpt["weights"]), cfg)
    engine.load_state_dict(ckpt["engine"])
    train(engine, cfg, batches[at:])
    return weights(engine)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_close(a: dict, b: dict, atol: float, what: str) -> float:
    diff = _max_diff(a, b)
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol:g}"
    return diff


def _assert_equal(a: dict, b: dict, what: str) -> None:
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: differs in {bad[:5]} (max |diff| {_max_diff(a, b):.3g})"


def skip_step_changes_nothing(cfg, precision_autocast: bool = False) -> dict:
    """Step 1 normal, step 2 with a NaN loss, step 3 normal. Returns what the test checks: step 2 left weights,
    EMA sources, Adam moments and Adam's step count as they were; the checkpoint counts the skipped step; a
    resume from it continues bit-identically; the engine's metrics say which step was skipped."""
    batches, objective = global_batches(), objective_for(cfg)
    engine = build_engine(new_model(cfg), cfg)

    def poisoned(model, mb):
        return {"total": objective(model, mb)["total"] * float("nan")}

    def step(batch, fn):
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision_autocast else contextlib.nullcontext():
            return engine.train_step(local_micro_batches(batch, engine.micro_batch_size, engine.dp_rank,
                                                         engine.dp_size), fn)

    step(batches[0], objective)
    before = (weights(engine), [s.detach().clone() for s in engine.ema_sources()], engine.state_dict())
    metrics = step(batches[1], poisoned)
    after = (weights(engine), [s.detach().clone() for s in engine.ema_sources()], engine.state_dict())
    out = {"nonfinite": metrics["nonfinite"].item(), "loss_is_nan": bool(torch.isnan(metrics["loss"])),
           "weights_same": _max_diff(before[0], after[0]) == 0.0,
           "sources_same": all(torch.equal(a, b) for a, b in zip(before[1], after[1])),
           "moments_same": all(torch.equal(before[2]["params"][0][n][k], after[2]["params"][0][n][k])
                               for n in before[2]["params"][0] for k in ("exp_avg", "exp_avg_sq")),
           "counters": after[2]["counters"], "impl": engine.optimizer_impl, "notes": list(engine.notes)}
    buf = io.BytesIO()
    torch.save({"weights": after[0], "engine": after[2]}, buf)
    step(batches[2], objective)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = build_engine(new_model(cfg, saved["weights"]), cfg)
    fresh.load_state_dict(saved["engine"])
    engine, straight = fresh, weights(engine)
    step(batches[2], objective)
    out["resume_exact"] = _max_diff(weights(fresh), straight) == 0.0
    return out


def check_skip(result: dict) -> None:
    assert result["nonfinite"] == 1.0 and result["loss_is_nan"], result
    assert result["weights_same"] and result["sources_same"] and result["moments_same"], result
    assert result["counters"]["optimizer_steps"] == 2 and result["counters"]["nonfinite_steps"] == 1, result
    assert result["resume_exact"], result


def held_masters(engine) -> dict:
    """What a sharded EMA follows on this rank (``engine.master_pieces()``): dtypes and element count."""
    pieces = engine.master_pieces()
    return {"dtypes": sorted({str(p.tensor.dtype) for p in pieces}), "held": sum(p.tensor.numel() for p in pieces),
            "sources_are_pieces": all(s is p.tensor for s, p in zip(engine.ema_sources(), pieces))}


def check_held(ranks: list, name: str) -> None:
    """bf16 weights: the pieces are fp32 masters, and the ranks' pieces cover the model's trainable elements once."""
    trainable = sum(p.numel() for p in new_model(tiny_config()).parameters() if p.requires_grad)
    assert all(r[name]["masters"]["dtypes"] == ["torch.float32"] for r in ranks), name
    assert all(r[name]["masters"]["sources_are_pieces"] for r in ranks), name
    assert sum(r[name]["masters"]["held"] for r in ranks) == trainable, name


# ----------------------------------------------------------------------------------------------- ranks
MEGATRON = {  # name -> overrides; all at the same global batch of 8
    "ddp": ["parallel.distributed_optimizer=false"],
    "distopt": ["parallel.distributed_optimizer=true"],
    "distopt_overlap_accum": ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                              "train.micro_batch_size=2"],
}


def _megatron_ranks(rank, world_size):
    from sfd_scale.parallel.layout import ParallelLayout, initialize

    initialize(ParallelLayout())
    names = MEGATRON if world_size > 1 else ("ddp", "distopt")
    out = {name: run(tiny_config("parallel.engine=megatron", *MEGATRON[name])) for name in names}
    if world_size == 1:
        return out
    for name in ("ddp", "distopt"):
        out[f"resumed_{name}"] = resumed(tiny_config("parallel.engine=megatron", *MEGATRON[name]))
    # a checkpoint before the first step (megatron's own DistributedOptimizer.state_dict() asserts there)
    out["resumed0_distopt"] = resumed(tiny_config("parallel.engine=megatron", *MEGATRON["distopt"]), at=0)
    out["skip_distopt"] = skip_step_changes_nothing(tiny_config("parallel.engine=megatron", *MEGATRON["distopt"]))
    out["skip_bf16_ddp"] = skip_step_changes_nothing(
        tiny_config("parallel.engine=megatron", "parallel.distributed_optimizer=false", "train.precision=bf16"), True)
    cfg = tiny_config("parallel.engine=megatron", "train.precision=bf16")
    engine = build_engine(new_model(cfg), cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # around the engine's own autocast of the forward
        metrics = train(engine, cfg, global_batches(1))
    out["bf16"] = {"metrics": metrics, "param_dtype": str(next(engine.module.parameters()).dtype),
                   "main_dtypes": sorted({str(p.dtype) for g in engine.optimizer.param_groups for p in g["params"]}),
                   "masters": held_masters(engine)}
    try:
        build_engine(new_model(cfg), tiny_config("parallel.engine=plain"))
    except ConfigError as err:
        out["plain_error"] = str(err)
    return out


DEEPSPEED_STAGES = (1, 2, 3)


def _deepspeed_ranks(rank, world_size):
    from sfd_scale.parallel.layout import ParallelLayout, initialize

    t0 = time.time()
    initialize(ParallelLayout())  # the model's layers are megatron's (TP = 1)
    # the DP = 1 reference, computed inside rank 0 (build_engine refuses 'plain' with 2 ranks)
    out = {"plain": run(tiny_config("parallel.engine=plain"), engine_cls=PlainEngine)} if rank == 0 else {}
    for stage in DEEPSPEED_STAGES:
        cfg = tiny_config("parallel.engine=deepspeed", f"parallel.zero_stage={stage}")
        out[f"zero{stage}"] = run(cfg)
        if stage in (2, 3):
            out[f"resumed_zero{stage}"] = resumed(cfg)
    out["skip_zero2"] = skip_step_changes_nothing(tiny_config("parallel.engine=deepspeed", "parallel.zero_stage=2"))
    out["skip_zero3"] = skip_step_changes_nothing(tiny_config("parallel.engine=deepspeed", "parallel.zero_stage=3"))
    # a non-fused optimizer: the flag read on the host and the step discarded as ZeRO-3 discards an fp16 overflow
    out["skip_zero3_unfused"] = skip_step_changes_nothing(
        tiny_config("parallel.engine=deepspeed", "parallel.zero_stage=3", "optim.fused=false"))
    for stage in (2, 3):
        cfg = tiny_config("parallel.engine=deepspeed", f"parallel.zero_stage={stage}", "train.precision=bf16")
        engine = build_engine(new_model(cfg), cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[f"bf16_zero{stage}"] = {"metrics": train(engine, cfg, global_batches(1)),
                                        "param_dtype": str(next(engine.module.parameters()).dtype),
                                        "masters": held_masters(engine)}
    out["seconds"] = time.time() - t0
    return out


def _megatron_pipeline_bf16(rank, world_size):
    """bf16 weights over pipeline stages, from the weights of ``new_model``; a one-process plain bf16 run of
    the same weights on rank 0 as the reference."""
    from sfd_scale.models.official import export_official_state_dict, load_official_state_dict
    from sfd_scale.parallel.layout import ParallelLayout, initialize
    from sfd_scale.parallel.pipeline import build_stages, stage_state_dict

    initialize(ParallelLayout(pipeline_parallel=world_size))
    cfg = tiny_config("parallel.engine=megatron", "train.precision=bf16", f"parallel.pipeline_parallel={world_size}")
    full = export_official_state_dict(new_model(cfg))
    chunks = build_stages(model_args(cfg))
    for chunk in chunks:
        load_official_state_dict(chunk, stage_state_dict(full, chunk))
    out = {"pipeline": train(build_engine(chunks, cfg), cfg, global_batches())}
    if rank == 0:
        out["plain"] = run(tiny_config("parallel.engine=plain", "train.precision=bf16"), engine_cls=PlainEngine)[1]
    return out


# ----------------------------------------------------------------------------------------------- tests
def test_megatron_dp2_matches_dp1_and_resumes_exactly():
    one = run_ranks(_megatron_ranks, 1)[0]
    two = run_ranks(_megatron_ranks, 2)
    for rank in (0, 1):  # replicas stay identical
        for name in MEGATRON:
            _assert_equal(two[rank][name][0], two[0][name][0], f"rank {rank} vs rank 0, {name}")
    # the distributed optimizer runs Adam on flat fp32 shards: equal to per-tensor DDP Adam up to an ulp
    _assert_close(one["distopt"][0], one["ddp"][0], ATOL, "DP=1: distributed optimizer vs DDP")
    diffs = {name: _assert_close(two[0][name][0], one["ddp"][0], ATOL, f"megatron {name} DP=2 vs DP=1")
             for name in MEGATRON}
    for name in MEGATRON:  # the reported loss is the mean over the global batch
        for m2, m1 in zip(two[0][name][1], one["ddp"][1]):
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5) and m2["lr"] == m1["lr"]
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
            check_terms(m2, m1, rel=1e-5)
            assert two[1][name][1] == two[0][name][1]  # every rank reads the same all-reduced numbers
    # resume after step 2 into fresh engines: bit-identical to not stopping (DistributedOptimizer fix)
    _assert_equal(two[0]["resumed_distopt"], two[0]["distopt"][0], "megatron distopt resume")
    _assert_equal(two[0]["resumed_ddp"], two[0]["ddp"][0], "megatron ddp resume")
    _assert_equal(two[0]["resumed0_distopt"], two[0]["distopt"][0], "megatron distopt resume from step 0")
    bf16 = two[0]["bf16"]
    assert bf16["param_dtype"] == "torch.bfloat16" and bf16["main_dtypes"] == ["torch.float32"], bf16
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in bf16["metrics"])
    check_held(two, "bf16")
    assert "parallel.engine='plain' runs in one process, but the world size is 2" in two[0]["plain_error"]
    for name in ("skip_distopt", "skip_bf16_ddp"):  # a NaN step skipped on the device, on both ranks alike
        check_skip(two[0][name])
        assert two[1][name] == two[0][name]
    # no TE / apex here: megatron's torch fallback, switched to the fused kernel, and the run log is told
    assert two[0]["skip_distopt"]["impl"] == "torch fused AdamW", two[0]["skip_distopt"]["impl"]
    assert "falls back to torch's AdamW (switched to torch's fused AdamW)" in two[0]["skip_distopt"]["notes"][0]
    print("megatron DP=2 vs DP=1 max |diff|:", diffs)


def test_deepspeed_zero_matches_plain_and_resumes_exactly():
    ranks = run_ranks(_deepspeed_ranks, 2, timeout=600)
    plain = ranks[0]["plain"][0]
    diffs = {}
    for stage in DEEPSPEED_STAGES:
        _assert_equal(ranks[1][f"zero{stage}"][0], ranks[0][f"zero{stage}"][0], f"ZeRO-{stage} replicas")
        diffs[stage] = _assert_close(ranks[0][f"zero{stage}"][0], plain, ATOL, f"ZeRO-{stage} DP=2 vs plain")
        for m_ds, m_plain in zip(ranks[0][f"zero{stage}"][1], ranks[0]["plain"][1]):
            assert m_ds["loss"] == pytest.approx(m_plain["loss"], rel=1e-5) and m_ds["lr"] == m_plain["lr"]
            assert m_ds["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-5)
            check_terms(m_ds, m_plain, rel=1e-5)
    for stage in (2, 3):
        _assert_equal(ranks[0][f"resumed_zero{stage}"], ranks[0][f"zero{stage}"][0], f"ZeRO-{stage} resume")
    for name in ("skip_zero2", "skip_zero3", "skip_zero3_unfused"):
        check_skip(ranks[0][name])
        assert ranks[1][name] == ranks[0][name], name
    assert ranks[0]["skip_zero2"]["impl"] == ranks[0]["skip_zero3"]["impl"] == "torch fused AdamW"
    assert "reads a flag on the host" in ranks[0]["skip_zero3_unfused"]["impl"]
    for name in ("bf16_zero2", "bf16_zero3"):
        bf16 = ranks[0][name]
        assert bf16["param_dtype"] == "torch.bfloat16" and torch.isfinite(torch.tensor(bf16["metrics"][0]["loss"]))
        check_held(ranks, name)
    print("DeepSpeed vs plain max |diff|:", diffs, "rank time", round(ranks[0]["seconds"], 1))


def test_megatron_pipeline_trains_in_bf16():
    """The activations between stages travel in bf16 (megatron's pipeline_dtype follows the weights)."""
    ranks = run_ranks(_megatron_pipeline_bf16, 2)
    losses = [m["loss"] for m in ranks[0]["pipeline"]]
    assert all(torch.isfinite(torch.tensor(losses))) and not any(m["nonfinite"] for m in ranks[0]["pipeline"])
    assert [m["loss"] for m in ranks[1]["pipeline"]] == losses  # summed over the stages: the same on each
    # bf16 weights against fp32 weights under autocast: the same training up to bf16 rounding
    assert losses == pytest.approx([m["loss"] for m in ranks[0]["plain"]], rel=1e-2)
    # the terms come from the last stage to every stage (rank 0 logs them)
    assert [m["terms"] for m in ranks[1]["pipeline"]] == [m["terms"] for m in ranks[0]["pipeline"]]
    for m_pp, m_plain in zip(ranks[0]["pipeline"], ranks[0]["plain"]):
        check_terms(m_pp, m_plain, rel=1e-2)


def test_plain_engine_is_the_trainer_arithmetic():
    """One micro-batch: bit-identical to the single-process trainer's AdamW / LambdaLR / clip sequence."""
    cfg = tiny_config("parallel.engine=plain")
    batches, objective = global_batches(), objective_for(cfg)
    engine_weights, metrics = run(cfg, batches)
    model = new_model(cfg)
    o = cfg.optim
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=(o.beta1, o.beta2),
                            eps=o.eps, weight_decay=o.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps))
    for b, m in zip(batches, metrics):
        terms = objective(model, b)
        loss = terms["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        assert (m["loss"], m["grad_norm"], m["lr"]) == (loss.item(), norm.item(), opt.param_groups[0]["lr"])
        assert m["terms"] == {k: terms[k].item() for k in LOGGED}  # the objective's own term means
        opt.step()
        sched.step()
    _assert_equal(engine_weights, {k: v.detach().float() for k, v in model.state_dict().items() if torch.is_tensor(v)},
                  "plain vs trainer")


def test_plain_engine_skips_a_nonfinite_step_on_the_device():
    result = skip_step_changes_nothing(tiny_config("parallel.engine=plain"))
    check_skip(result)
    assert result["impl"] == "torch fused AdamW" and result["notes"] == []
    # a non-fused optimizer cannot take the flag: the engine reads it on the host, and says so
    result = skip_step_changes_nothing(tiny_config("parallel.engine=plain", "optim.fused=false"))
    check_skip(result)
    assert result["impl"] == "torch single-tensor AdamW (the non-finite check reads a flag on the host every step)"


def test_gradient_accumulation_matches_one_batch():
    whole, m1 = run(tiny_config("parallel.engine=plain"))
    accum, m2 = run(tiny_config("parallel.engine=plain", "train.micro_batch_size=4"))
    assert PlainEngine(new_model(tiny_config()), tiny_config("train.micro_batch_size=4")).num_micro_batches == 2
    _assert_close(accum, whole, ATOL, "2 micro-batches of 4 vs 1 batch of 8")
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-6)
    for a, b in zip(m2, m1):
        check_terms(a, b, rel=1e-6)


def test_plain_engine_state_round_trip_is_exact():
    cfg = tiny_config("parallel.engine=plain")
    reference, _ = run(cfg)
    assert _max_diff(resumed(cfg), reference) == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["parallel.engine=fsdp"], "parallel.engine"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["parallel.engine=megatron", "parallel.distributed_optimizer=false", "parallel.shard_ema=true"],
     "parallel.shard_ema=true needs an optimizer sharded over data-parallel ranks, but parallel.distributed_optimizer"),
    (["parallel.engine=plain", "parallel.shard_ema=true"], "parallel.shard_ema=true needs"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.shard_ema=false"],
     "parallel.shard_ema=false cannot be combined with parallel.zero_stage=3"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.micro_batch_size=3"], r"train.global_batch_size \(8\) must be a multiple of train.micro_batch_size \(3\)"),
])
def test_bad_layout_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_layout_against_data_parallel_size():
    assert micro_batch_layout(tiny_config(), 2) == (4, 1)
    assert micro_batch_layout(tiny_config("train.micro_batch_size=2"), 2) == (2, 2)
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(8\) is not divisible by the data-parallel size \(3\)"):
        micro_batch_layout(tiny_config(), 3)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(8\) x data-parallel size \(2\)"):
        micro_batch_layout(tiny_config("train.micro_batch_size=8"), 2)
