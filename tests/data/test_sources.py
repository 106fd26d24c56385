"""Training data sources: the synthetic source (benchmarks, cost model)."""
import torch

from sfd_scale.config import load_config
from sfd_scale.data.sources import Placement, build_training_data


def test_synthetic_source_shapes_and_keys():
    cfg = load_config([], ["data.source=synthetic", "model.name=LightningDiT-S/1", "model.input_size=4",
                           "model.use_repa=true", "model.num_classes=10", "train.seed=3"])
    data = build_training_data(cfg)
    assert data.channels == 48 and data.has_repa_features and data.num_classes == 10
    rank0 = iter(data.batches(5, Placement(global_batch=8, dp_rank=0, dp_size=2)))
    rank1 = iter(data.batches(5, Placement(global_batch=8, dp_rank=1, dp_size=2)))
    a, b = next(rank0), next(rank1)
    assert a["latent"].shape == (4, 48, 4, 4) and a["repa"].shape == (4, 768, 4, 4)
    assert a["repa"].dtype == torch.float16 and int(a["label"].max()) < 10
    # dataset indices: step 5's global batch, this rank's contiguous share; the next step moves on
    assert a["index"].tolist() == [40, 41, 42, 43] and b["index"].tolist() == [44, 45, 46, 47]
    assert next(rank0)["index"].tolist() == [48, 49, 50, 51]
    again = next(iter(data.batches(5, Placement(global_batch=8, dp_rank=0, dp_size=2))))
    assert torch.equal(again["latent"], a["latent"])  # a pure function of (seed, rank)
