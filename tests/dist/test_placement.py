"""The start-up line saying where the ranks run (``layout.placement_line``): hosts with their ranks, and a warning
when a tensor-parallel group spans hosts. Host names are faked per rank here; tests/slurm/test_multinode.py
reads the line from a real two-node run."""
from sfd_scale.parallel.layout import _spans
from tests.dist.harness import run_ranks


def _placements(rank, world_size, cases):
    """One line per (host of each rank, TP size) case, the layout set up afresh for each (one launch)."""
    import socket

    from megatron.core import parallel_state

    from sfd_scale.parallel.layout import ParallelLayout, initialize, placement_line

    lines = []
    for hosts, tp in cases:
        socket.gethostname = lambda: hosts[rank]  # this rank's "host"
        initialize(ParallelLayout(tensor_parallel=tp))
        lines.append(placement_line())
        parallel_state.destroy_model_parallel()
    return lines


def test_ranks_per_host_and_tensor_parallel_groups():
    cases = [(["nodeA", "nodeA"], 2), (["nodeA", "nodeB"], 2), (["nodeA", "nodeB"], 1)]
    same, split, dp = run_ranks(_placements, 2, args=(cases,))[0]
    assert same == "ranks per host: nodeA 0-1; tensor-parallel groups 0-1: each within one host"
    assert split.startswith("ranks per host: nodeA 0, nodeB 1; tensor-parallel groups 0-1: 1 of 1 span hosts")
    assert "--ntasks-per-node at a multiple of parallel.tensor_parallel" in split
    assert dp == "ranks per host: nodeA 0, nodeB 1; tensor-parallel groups 0, 1: each within one host"


def test_rank_spans():
    assert [_spans(r) for r in ([0], [0, 1, 2, 5], [3, 5, 6])] == ["0", "0-2,5", "3,5-6"]
