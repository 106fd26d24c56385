"""The sharded EMA on one process: pieces of the masters averaged, gathered and loaded back exactly.

(Its multi-rank runs with megatron's distributed optimizer and ZeRO are in ``tests/dist/test_sharded_ema.py``.)
"""
import torch
import torch.nn as nn

from sfd_scale.parallel.engines.base import MasterPiece
from sfd_scale.train.ema import EMA, ShardedEMA, frozen_state


class Small(nn.Module):
    """Trainable weights, a frozen parameter and a non-persistent buffer, like LightningDiT's pos_embed / RoPE."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)
        self.pos = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("table", torch.arange(6.0), persistent=False)


def skeleton() -> nn.Module:
    with torch.device("meta"):
        return Small()


def pieces_of(model: nn.Module):
    """Every trainable parameter cut into two pieces (live views), as two DP ranks would hold them."""
    out = []
    for index, p in enumerate(q for q in model.parameters() if q.requires_grad):
        flat, cut = p.detach().view(-1), p.numel() // 2 + 1
        out += [MasterPiece(index, 0, flat[:cut]), MasterPiece(index, cut, flat[cut:])]
    return out


def test_ema_of_pieces_is_the_whole_ema_bit_for_bit_and_loads_back():
    torch.manual_seed(0)
    model = Small()
    pieces = pieces_of(model)
    whole = EMA(model, decay=0.7)
    sharded = ShardedEMA(skeleton, pieces, None, frozen_state(model), 0.7, torch.device("cpu"))
    assert sum(s.numel() for s in sharded.shards) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        skip = torch.tensor(float(step == 2))  # a skipped step leaves both as they were
        whole.update(skip=skip)
        sharded.update([piece.tensor for piece in pieces], skip=skip)
    reference = {k: v.clone() for k, v in whole.model.state_dict().items()} | {"table": whole.model.table.clone()}
    with sharded.full_model() as gathered:
        got = gathered.state_dict() | {"table": gathered.table}
        assert not any(p.requires_grad for p in gathered.parameters())
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert not torch.equal(got["proj.weight"], model.proj.weight)  # (it moved, and not onto the weights)

    # a checkpoint's full EMA into a fresh sharded EMA: the same pieces, so the same full EMA
    fresh = ShardedEMA(skeleton, pieces_of(Small()), None, frozen_state(Small()), 0.7, torch.device("cpu"))
    with fresh.loading_chunks() as (chunk,):
        chunk.load_state_dict(whole.model.state_dict())
    with fresh.full_chunks() as (chunk,):
        again = chunk.state_dict() | {"table": chunk.table}
    assert all(torch.equal(again[k], reference[k]) for k in reference)
