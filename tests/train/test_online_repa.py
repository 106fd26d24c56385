"""Training on REPA targets computed online (``data.repa_features=online``) against the same run on the stored
targets of the same dataset: the same batches, flips and draws, targets within float16 rounding of each other
(``tests/data/test_online_repa.py``), so the losses agree step for step to that precision. SIGKILL + resume in
online mode: ``tests/train/test_fault_tolerance.py`` (case ``online``)."""
from __future__ import annotations

import json

import pytest
import torch

from sfd_scale.config import load_config
from sfd_scale.train.trainer import Trainer
from tests.data.online_data import extract_online, photo_tree

# a tiny LightningDiT on the tiny dataset (48 channels of 4x4 latents, 768-d targets, 2 classes)
ONLINE_RUN = ["data.source=shards", "data.canonical_nodes=1", "data.num_workers=0", "data.repa_chunk=4",
              "model.use_repa=true", "model.repa_depth=1", "model.repa_projector_dim=16", "model.repa_feature_dim=768",
              "model.input_size=4", "model.num_classes=2", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
              "sfd.texture_chans=32", "sfd.semantic_chans=16", "train.global_batch_size=4", "train.device=cpu",
              "train.log_every=1", "logging.wandb_mode=disabled", "logging.progress=false", "optim.lr=1e-3",
              "parallel.engine=plain", "sample.method=euler", "sample.num_steps=2", "sample.grid_images=2"]


@pytest.fixture(scope="module")
def online_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_train")
    return extract_online(photo_tree(root / "photos"), root / "ds")


def _losses(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["loss_repa"]) for r in rows}


def test_online_run_equals_the_stored_run_step_for_step(online_dataset, tmp_path, streaming_tmp):
    runs = {}
    for mode in ("stored", "online"):
        cfg = load_config([], [*ONLINE_RUN, f"data.path={online_dataset}", f"data.repa_features={mode}",
                               "train.max_steps=6", f"train.output_dir={tmp_path / mode}"])
        trainer = Trainer(cfg)
        assert ("REPA targets computed online" in trainer.data.description) == (mode == "online")
        trainer.fit()
        runs[mode] = _losses(tmp_path / mode)
    stored, online = runs["stored"], runs["online"]
    assert sorted(online) == sorted(stored) == list(range(1, 7))
    # step k's loss also depends on the weights after k - 1 steps (Adam's first steps rescale tiny gradient
    # differences to ~lr, so the weights are not compared directly)
    for step in stored:  # the loss and its REPA term, within what the targets' float16 rounding moves them
        torch.testing.assert_close(torch.tensor(online[step]), torch.tensor(stored[step]), rtol=1e-5, atol=1e-7)
    assert any(online[s] != stored[s] for s in stored)  # two computations of the targets, not one
