"""Conversion across layouts and engines: official -> native -> a TP = 2 x PP = 2 run's own checkpoint ->
official reproduces the original tensors; a DeepSpeed ZeRO-3 checkpoint converts to the same weights."""
import torch

from sfd_scale.config import load_config
from sfd_scale.models.official import read_checkpoint
from sfd_scale import checkpoint_store as store
from sfd_scale.train import convert
from tests.dist.harness import run_ranks
from tests.dist.test_engines import global_batches, new_model, tiny_config, train, weights
from tests.train.test_convert import golden_overrides, same


def _resave(rank, world_size, overrides):
    """A TP = 2 x PP = 2 run resumes the converted checkpoint (each rank loads its shard) and writes its own."""
    from sfd_scale.train.trainer import Trainer

    trainer = Trainer(load_config(["configs/demo/digits.yaml"], overrides))
    assert trainer.resumed_from is not None and trainer.step == 0
    path = trainer.save()
    trainer.checkpointer.wait()
    return str(path)


def test_official_to_native_through_tp2_pp2_and_back_is_exact(golden_dir, tmp_path):
    overrides = golden_overrides(golden_dir) + [
        "data.source=official", f"data.path={golden_dir / 'latent_dataset_repa'}", "train.global_batch_size=2",
        "train.micro_batch_size=1", "train.sample_every=0", "logging.wandb_mode=disabled", "logging.progress=false",
        "parallel.engine=megatron", "parallel.distributed_optimizer=false", f"train.output_dir={tmp_path / 'run'}",
        "checkpoint.resume=true"]
    src = golden_dir / "weights.safetensors"
    convert.official_to_native(src, load_config(["configs/demo/digits.yaml"], overrides), tmp_path / "run")
    paths = run_ranks(_resave, 4, args=(overrides + ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"],))
    written = store.manifest(paths[0])["layout"]
    assert (written["tensor_parallel"], written["pipeline_parallel"]) == (2, 2)
    back = torch.load(convert.native_to_official(paths[0], tmp_path / "back.pt"), weights_only=True)
    original = read_checkpoint(src)
    same(back["ema"], original)
    same(back["model"], original)


def _zero3(rank, world_size, ds_dir):
    from sfd_scale.parallel.engines import build_engine
    from sfd_scale.parallel.layout import ParallelLayout, initialize

    initialize(ParallelLayout())
    cfg = tiny_config("parallel.engine=deepspeed", "parallel.zero_stage=3")
    engine = build_engine(new_model(cfg), cfg)
    train(engine, cfg, global_batches(2))
    engine.model.save_checkpoint(str(ds_dir))  # DeepSpeed's own format, partitioned over the 2 ranks
    return weights(engine)


def test_deepspeed_zero3_checkpoint_to_native_matches(tmp_path):
    full = run_ranks(_zero3, 2, args=(tmp_path / "ds",), timeout=600)[0]
    native = convert.deepspeed_to_native(tmp_path / "ds", tiny_config(), tmp_path / "run", step=2)
    got = store.read_weights(native, "model")
    same(got, {k: v for k, v in full.items() if k in got})
    assert set(got) == set(full)
