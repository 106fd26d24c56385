"""The streaming latent loader over ranks: disjoint and complete shares, deterministic per seed and epoch,
the same global batches on 1 or 2 data-parallel ranks, equal batches inside a model-parallel group, exact
mid-epoch resume — and the trainer on shards gives the same model on DP = 2 as on one process."""
from __future__ import annotations


import pytest
import torch

from sfd_scale.data.sources import Placement, ShardBatches
from sfd_scale.data.shards import LatentShardDataset, Normalization
from tests.data.test_shards import write_toy_shards
from tests.dist.harness import run_ranks

N, GLOBAL = 40, 8   # 5 steps per epoch


def _indices(root, world, rank, start_step, steps, dp_size, replication=1, seed=0, workers=0, threads=None):
    """Sample indices and texture values of this rank's batches for ``steps`` steps from ``start_step``."""
    ds = LatentShardDataset(root, batch_size=GLOBAL // dp_size, seed=seed, canonical_nodes=2,
                            norm=Normalization(False, False, 1.0), replication=replication if replication > 1 else None)
    where = Placement(GLOBAL, dp_rank=rank // replication, dp_size=dp_size, replication=replication,
                      num_workers=workers)
    out = []
    for k, batch in enumerate(ShardBatches(ds, start_step, where, reader_threads=threads)):
        if k == steps:
            break
        # the texture latent holds +index (not flipped) or -index (flipped)
        assert torch.equal(batch["latent"][:, 0, 0, 0].abs().long(), batch["index"])
        out.append(batch["index"].tolist())
    return out


def _ranks(rank, world, root, start, steps, dp_size, replication, seed, workers, threads=None):
    return _indices(root, world, rank, start, steps, dp_size, replication, seed, workers, threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy_shards")
    write_toy_shards(path, n=N, chunk=16)
    return str(path)


def _global(per_rank):
    """Global batches: per step, the union (as a sorted list) of the ranks' shares."""
    return [sorted(sum((r[k] for r in per_rank), [])) for k in range(len(per_rank[0]))]


def test_two_ranks_disjoint_complete_and_layout_independent(root):
    two = run_ranks(_ranks, 2, args=(root, 0, 10, 2, 1, 0, 0))
    for step in range(10):
        assert not set(two[0][step]) & set(two[1][step])       # disjoint shares
    for epoch in range(2):
        seen = sorted(sum(_global(two)[epoch * 5:(epoch + 1) * 5], []))
        assert seen == list(range(N)), f"epoch {epoch} is not one pass over the data"
    assert _global(two)[:5] != _global(two)[5:]                # a new order each epoch
    one = run_ranks(_ranks, 1, args=(root, 0, 10, 1, 1, 0, 2))  # one rank, two reader threads
    assert _global(one) == _global(two)                          # same global batches on 1 or 2 ranks
    procs = run_ranks(_ranks, 2, args=(root, 0, 10, 2, 1, 0, 1, False))  # a loader worker process per rank
    assert procs == two                                          # and with any kind of reader
    again = run_ranks(_ranks, 2, args=(root, 0, 10, 2, 1, 0, 0))
    assert again == two                                          # deterministic per seed
    other = run_ranks(_ranks, 1, args=(root, 0, 5, 1, 1, 7, 0))
    assert _global(other) != _global(one)[:5]                    # and the seed matters


def test_model_parallel_group_reads_the_same_batches(root):
    tp = run_ranks(_ranks, 2, args=(root, 0, 6, 1, 2, 0, 0))     # 2 ranks, one replica (TP = 2)
    assert tp[0] == tp[1]
    assert _global([tp[0]]) == _global(run_ranks(_ranks, 1, args=(root, 0, 6, 1, 1, 0, 0)))


def test_mid_epoch_resume_gives_exactly_the_remaining_samples(root):
    full = run_ranks(_ranks, 2, args=(root, 0, 8, 2, 1, 0, 0))
    resumed = run_ranks(_ranks, 2, args=(root, 3, 5, 2, 1, 0, 0))   # restart at step 3 (mid epoch 0)
    assert [r[3:] for r in full] == resumed
    threaded = run_ranks(_ranks, 2, args=(root, 3, 5, 2, 1, 0, 2))  # reader threads read ahead; same resume
    assert threaded == resumed


# ------------------------------------------------------------------------------------------ trainer
def _train(rank, world, root, out, tp, steps, extra=()):
    from sfd_scale.config import load_config
    from sfd_scale.train.trainer import Trainer

    cfg = load_config([], [*extra, "data.source=shards", f"data.path={root}", "data.canonical_nodes=2", "data.num_workers=0",
                           "sfd.texture_chans=4", "sfd.semantic_chans=2", "model.name=LightningDiT-S/1",
                           "model.depth=2", "model.hidden_size=64", "model.num_heads=4", "model.input_size=2",
                           "model.num_classes=10", f"train.global_batch_size={GLOBAL}", f"train.max_steps={steps}",
                           f"train.output_dir={out}", "train.log_every=1", "train.device=cpu", "logging.wandb_mode=disabled",
                           "logging.progress=false", "optim.lr=1e-3", "parallel.engine=megatron",
                           f"parallel.tensor_parallel={tp}", "parallel.distributed_optimizer=false",
                           "sample.method=euler", "sample.num_steps=2", "sample.grid_images=2"])
    trainer = Trainer(cfg)
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.state.full_weights("model").items()}


def test_trainer_on_shards_equal_on_one_and_two_ranks(root, tmp_path):
    one = run_ranks(_train, 1, args=(root, str(tmp_path / "one"), 1, 7))[0]
    dp2 = run_ranks(_train, 2, args=(root, str(tmp_path / "dp2"), 1, 7))[0]
    tp2 = run_ranks(_train, 2, args=(root, str(tmp_path / "tp2"), 2, 7))[0]
    for key in one:
        torch.testing.assert_close(dp2[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(tp2[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_trainer_with_repa_targets_from_shards(tmp_path):
    """REPA targets travel from the shards (float16) to the loss; the run trains and its loss is finite."""
    root = tmp_path / "shards"
    write_toy_shards(root, n=16, chunk=16, repa=True)
    repa = ["model.use_repa=true", "model.repa_depth=1", "model.repa_projector_dim=8", "model.repa_feature_dim=3"]
    state = run_ranks(_train, 1, args=(str(root), str(tmp_path / "run"), 1, 2, repa))[0]
    assert any(k.startswith("repa_projector.") for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())
