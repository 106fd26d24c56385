"""Single-process trainer: it trains, checkpoints, samples, and resumes exactly."""

import json

import pytest
import torch

from sfd_scale.config import load_config, model_args
from sfd_scale import checkpoint_store as store
from sfd_scale.models.flops import training_flops_per_image
from sfd_scale.train.ema import EMA
from sfd_scale.train.trainer import Trainer

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "data.demo_samples=128",
        "train.global_batch_size=16", "train.log_every=2", "logging.wandb_mode=disabled", "logging.progress=false",
        "sample.method=euler", "sample.num_steps=4", "sample.grid_images=4", "optim.warmup_steps=2"]


def tiny_config(tmp_path, *extra):
    return load_config(["configs/demo/digits.yaml"], TINY + [f"train.output_dir={tmp_path}", *extra])


def test_fit_trains_checkpoints_and_samples(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "checkpoint.every=3", "optim.lr=3e-3")
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert store.latest(tmp_path).name == "step_0000006"
    assert (tmp_path / "checkpoints" / "step_0000003" / "manifest.json").is_file()
    assert (tmp_path / "samples" / "final.png").stat().st_size > 0
    newest = store.latest(tmp_path)
    ema = store.read_weights(newest, "ema")
    assert not any(k.endswith("_extra_state") for k in ema) and "blocks.1.attn.qkv.weight" in ema  # official names
    assert store.read_object(newest, "trainer")["step"] == 6
    assert store.read_object(newest, "config")["train"]["max_steps"] == 6
    info = store.manifest(newest)
    assert info["step"] == 6 and info["layout"]["world_size"] == 1 and "sfd_scale" in info["code"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    log = (tmp_path / "log.txt").read_text()
    assert "start: job" in log
    # the start-up line names what the step runs (issue #14): attention, optimizer, compile, precision
    hot = next(line for line in log.splitlines() if "hot path:" in line)
    for part in ("attention SDPA (CPU)", "optimizer torch fused AdamW", "compile off", "precision: weights float32"):
        assert part in hot, (part, hot)
    assert "training blocked" in log  # every save says how long it blocked training


def test_demo_metrics_hold_every_loss_term_and_the_rates(tmp_path):
    """Issue #18: metrics.jsonl of the demo holds each loss term and the throughput columns, and the terms are
    the objective's own: with one step per log line they add up to that step's loss by the formula of
    ``SFDObjective.term_means``, (Ct * texture + w * Cs * semantic) / (Ct + Cs) + cosine."""
    cfg = tiny_config(tmp_path, "train.max_steps=3", "train.log_every=1")
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    columns = ["step", "loss", "grad_norm", "lr", "loss_avg", "loss_texture", "loss_semantic", "loss_cos",
               "steps/s", "images_per_s", "tflops_per_s", "data_wait_frac"]
    gpu_only = {"mfu", "peak_mem_gb"} if trainer.device.type == "cuda" else set()
    ct, cs, w = cfg.sfd.texture_chans, cfg.sfd.semantic_chans, cfg.sfd.semantic_weight
    flops = training_flops_per_image(model_args(cfg))
    for r in rows:
        assert [k for k in r if k not in gpu_only] == columns, list(r)
        assert cfg.sfd.use_cosine_loss and not cfg.model.use_repa and w != 1.0  # the terms below, weighted
        mse = (ct * r["loss_texture"] + w * cs * r["loss_semantic"]) / (ct + cs)
        assert r["loss"] == pytest.approx(mse + r["loss_cos"], rel=1e-5)
        assert r["loss_avg"] == r["loss"] and r["loss_texture"] != r["loss_semantic"]
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
        assert r["tflops_per_s"] == pytest.approx(r["images_per_s"] * flops / 1e12)


def test_resume_is_exact(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a", "train.max_steps=6"))
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", "train.max_steps=3"))
    first.fit()
    resumed = Trainer(tiny_config(tmp_path / "b", "train.max_steps=6", "checkpoint.resume=true"))
    assert resumed.step == 3
    resumed.fit()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


def test_bf16_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.precision=bf16", "train.max_steps=1"))
    batch = next(iter(trainer.loader()))
    metrics = trainer.train_step(batch)
    assert torch.isfinite(metrics["loss"]) and metrics["nonfinite"].item() == 0  # device tensors (parallel/engines/)


def test_corrupt_checkpoint_is_passed_over(tmp_path):
    Trainer(tiny_config(tmp_path, "train.max_steps=2", "checkpoint.every=1")).fit()
    newest = store.latest(tmp_path)
    data = sorted(newest.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:-7])  # truncated
    skipped = []
    assert store.latest(tmp_path, report=skipped.append).name == "step_0000001"
    assert "step_0000002" in skipped[0] and "bytes, the manifest says" in skipped[0]
    with pytest.raises(store.CheckpointError, match="cannot be used"):
        store.read_weights(newest)
    resumed = Trainer(tiny_config(tmp_path, "train.max_steps=2", "checkpoint.every=1", "checkpoint.resume=true"))
    assert resumed.step == 1 and "skipping checkpoint" in resumed.notes[0]


def test_ema_update_rule(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1"))
    ema = EMA(trainer.model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update()
    for (name, p), (_, e) in zip(trainer.model.named_parameters(), ema.model.named_parameters()):
        expected = 0.9 * before[name] + 0.1 * p if p.requires_grad else before[name]
        assert torch.allclose(e, expected, atol=1e-6), name


def test_periodic_fid_on_ema_weights_is_logged_and_plotted(tmp_path):
    from sfd_scale.eval.plots import plot_run

    cfg = tiny_config(tmp_path, "train.max_steps=2", "eval.fid_every=2", "eval.fid_images=20", "eval.fid_batch=10",
                      "eval.fid_reference=demo")
    Trainer(cfg).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fid = [r for r in rows if "fid" in r]
    assert len(fid) == 1 and fid[0]["step"] == 2 and 0 < fid[0]["fid"] < 1e4 and fid[0]["num_images"] == 20
    assert "step 2: FID" in (tmp_path / "log.txt").read_text()
    assert list((tmp_path / "fid" / "step_0000002").glob("samples_20x16x16x3.npz"))
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "fid.png"]


# ----------------------------------------------------------------------------------------------- user errors
def _train_tool(tmp_path, capsys, out, *extra) -> str:
    """``tools/train.py`` on the tiny demo run: exit status 2 and the one stderr line it gives."""
    from tools import train as train_tool

    argv = ["--config", "configs/demo/digits.yaml", *TINY, f"train.output_dir={out}", "train.max_steps=2", *extra]
    assert train_tool.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def toy_shards(tmp_path, streaming_tmp):
    from tests.data.test_shards import write_toy_shards

    write_toy_shards(tmp_path / "shards", n=40, chunk=16)  # 4 texture + 2 semantic channels at 2x2, 10 classes
    return tmp_path / "shards"


SHARDS = ["data.source=shards", "model.input_size=2", "data.num_workers=0"]


@pytest.mark.parametrize("damage,message", [
    ("split", "channel split does not add up: sfd.texture_chans (4) + sfd.semantic_chans (4) = 8, but the data's "
              "latent channels (shards, {root}) = 6: set sfd.texture_chans / sfd.semantic_chans"),
    ("deleted", "shard file {root}/part_0000001/shard.00000.mds is missing (deleted?): restore it"),
    ("truncated", "shard file {root}/part_0000001/shard.00000.mds has 100 bytes, index.json says"),
    ("no dataset", "{root}/sfd_dataset.json not found: {root} is not a finished sfd_scale latent dataset"),
])
def test_data_problems_are_one_line_before_anything_is_written(tmp_path, capsys, toy_shards, damage, message):
    shard = toy_shards / "part_0000001" / "shard.00000.mds"
    extra = ["sfd.semantic_chans=4"] if damage == "split" else []
    if damage == "deleted":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    root = toy_shards if damage != "no dataset" else tmp_path / "nowhere"
    line = _train_tool(tmp_path, capsys, tmp_path / "run", *SHARDS, f"data.path={root}", *extra)
    assert message.format(root=root) in line
    assert not (tmp_path / "run").exists()  # no config.yaml, log or metrics of a run that never started


def test_init_from_a_text_file_and_an_unusable_output_dir(tmp_path, capsys, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    line = _train_tool(tmp_path, capsys, tmp_path / "run", f"checkpoint.init_from={text}")
    assert line.startswith(f"error: checkpoint.init_from={text}: unreadable checkpoint {text}: not a torch.save "
                           f"archive") and line.endswith("give an official .pt / .safetensors or an sfd_scale "
                                                         "checkpoint directory")
    assert not (tmp_path / "run").exists()
    line = _train_tool(tmp_path, capsys, text / "run")
    assert line == f"error: train.output_dir={text / 'run'} cannot hold the run: {text} is a file, not a directory; " \
                   f"choose another directory"
    import os

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    real_access = os.access  # root writes anywhere whatever the mode: answer as for everybody else
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    line = _train_tool(tmp_path, capsys, locked / "run")
    assert f"train.output_dir={locked / 'run'} cannot hold the run: {locked} is not writable" in line
    assert list(locked.iterdir()) == []


def test_a_changed_run_refuses_to_resume_in_one_line(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, "train.max_steps=2")).fit()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for change, message in [
        ("train.global_batch_size=32", "was trained with train.global_batch_size=16, this run has 32"),
        ("train.seed=3", "was trained with train.seed=0, this run has 3"),
        ("model.hidden_size=64", "does not fit this model (state dict does not fit the model: shape mismatches"),
    ]:
        line = _train_tool(tmp_path, capsys, tmp_path, "checkpoint.resume=true", "train.max_steps=4", change)
        assert f"checkpoint {tmp_path}/checkpoints/step_0000002 " in line and message in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_too_many_nonfinite_steps_exit_2_after_the_checkpoint(tmp_path, capsys, monkeypatch):
    from sfd_scale.train import trainer as trainer_module

    class NaNObjective(trainer_module.SFDObjective):
        def __call__(self, model, mb):
            terms = super().__call__(model, mb)
            return terms | {"total": terms["total"] * float("nan")}

    monkeypatch.setattr(trainer_module, "SFDObjective", NaNObjective)
    line = _train_tool(tmp_path, capsys, tmp_path, "train.max_nonfinite_steps=2", "train.max_steps=5")
    assert line.startswith(f"error: 2 steps had a non-finite loss or grad norm (train.max_nonfinite_steps=2); "
                           f"stopped at step 2 with a checkpoint in {tmp_path}")
    assert "raise train.max_nonfinite_steps above 2" in line
    assert store.latest(tmp_path).name == "step_0000002"
