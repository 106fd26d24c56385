"""slurm/train.sbatch on two nodes (``slurm_nodes``: network, UTS and mount namespaces on this machine, one
slurmd and munged each, one slurmctld; see netns.py): TP = 2 x DP = 2 over 4 srun tasks, 2 per node, meeting
through the same rendezvous code users get (slurm_env.slurm_rendezvous). The job is signalled mid-run,
requeues itself, resumes from its checkpoint on both nodes and ends with exactly the weights, EMA, optimizer
state and loss log of an uninterrupted run of the same layout on one node (a third node, at the same time: the
jobs' start-ups overlap). Streaming's shared memory and our leases live in each node's own /dev/shm: every
node has its own local leader and prefix."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from tests.data.test_shards import write_toy_shards

from .test_sbatch import check_requeued_run

STEPS = 150  # 64 samples in batches of 8: 18 epochs, each starting at a barrier of each node's ranks
# The checkpoint tensors compared. Not the packed objects: the config names its output_dir; and not the global
# RNG states (``rng/``): no training draw comes from them (TrainingDraws keys every draw by seed and step),
# and a resumed run's torch RNG state differs from an uninterrupted one's on one process too (measured on the
# demo config: not a multi-node matter).
COMPARED = ("model/", "ema/", "optim/")


def write_config(path: Path, shards: Path) -> Path:
    """A tiny TP = 2 model on toy latent shards (4 texture + 2 semantic channels at 2 x 2), megatron engine
    with the distributed optimizer (its state sharded over the two DP ranks, one per node)."""
    path.write_text(f"""\
model: {{name: LightningDiT-S/1, depth: 2, hidden_size: 64, num_heads: 4, input_size: 2, num_classes: 10,
        use_repa: false}}
sfd: {{texture_chans: 4, semantic_chans: 2}}
data: {{source: shards, path: {shards}, canonical_nodes: 2, num_workers: 0}}
parallel: {{engine: megatron, tensor_parallel: 2, distributed_optimizer: true}}
optim: {{lr: 1.0e-3, eps: 1.0e-3, warmup_steps: 2}}
train: {{global_batch_size: 8, max_steps: {STEPS}, log_every: 10, device: cpu}}
checkpoint: {{every: 1000, resume: true}}
logging: {{wandb_mode: disabled, progress: false}}
sample: {{method: euler, num_steps: 2, grid_images: 2}}
""")
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_toy_shards(root, n=64, chunk=16)
    return root


def checkpoint_tensors(run: Path) -> dict:
    """Every stored tensor of the newest verified checkpoint under COMPARED's prefixes, read in this process."""
    import torch.distributed.checkpoint as dcp

    from sfd_scale import checkpoint_store as store
    last = store.latest(run)
    assert last is not None, f"no verified checkpoint in {run}"
    meta = store.stored_keys(last)
    state = store.empty_like_stored(last, [k for k in meta if k.startswith(COMPARED)], meta)
    with warnings.catch_warnings():  # one process reading a DCP save: expected
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(last), no_dist=True)
    return {"checkpoint": last.name, **state}


def logged_losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in rows}


def node_shm(cluster, node: str) -> dict:
    """What a node's /dev/shm holds: streaming's segments by prefix, and our leases (prefix -> owner pids)."""
    names = cluster.hosts.run(node, "ls", "-A", "/dev/shm").split()
    leases: dict = {}
    for name in cluster.hosts.run(node, "sh", "-c", "ls /dev/shm/sfd_scale_leases 2>/dev/null || true").split():
        prefix, pid = re.fullmatch(r"(\d{6})_(\d+)\.json", name).groups()
        leases.setdefault(prefix, set()).add(int(pid))
    return {"segments": sorted(n for n in names if re.match(r"\d{6}_", n)), "leases": leases}


def check_per_node_shared_memory(cluster, nodes) -> None:
    """Mid-run: each node's local leader registered streaming's prefix 000000 in that node's own /dev/shm (one
    /dev/shm for all would give the second node 000001, or fail), and the node's two ranks, both running
    there, hold its leases."""
    for node in nodes:
        shm, inside = node_shm(cluster, node), set(cluster.hosts.pids(node))
        assert "000000_locals" in shm["segments"] and all(s.startswith("000000_") for s in shm["segments"]), shm
        assert list(shm["leases"]) == ["000000"] and len(shm["leases"]["000000"]) == 2, shm
        assert shm["leases"]["000000"] <= inside, (node, shm, inside)  # this node's ranks, not the other's


def submit(cluster, tmp_path: Path, config: str, run: Path, *layout: str) -> tuple:
    job = cluster.sbatch(*layout, "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%x-%j.out",
                         "slurm/train.sbatch", config, f"train.output_dir={run}")
    return job, tmp_path / f"sfd-train-{job}.out"


def test_two_nodes_requeue_and_finish_like_one_node(slurm_nodes, shards, tmp_path):
    cluster, config = slurm_nodes, str(write_config(tmp_path / "tp2dp2.yaml", shards))
    run, ref = tmp_path / "two_nodes", tmp_path / "one_node"
    job, log = submit(cluster, tmp_path, config, run, "--nodes=2", "--nodelist=vnode1,vnode2", "--ntasks-per-node=2")
    # at the same time, on a node of its own: the same layout on one node (4 tasks), never interrupted
    ref_job, ref_log = submit(cluster, tmp_path, config, ref, "--nodes=1", "--nodelist=vnode3", "--ntasks-per-node=4")
    cluster.wait_for_text(log, r"step 10:", timeout=300, job_id=job)
    check_per_node_shared_memory(cluster, ["vnode1", "vnode2"])
    cluster.signal(job, "USR1", batch=True)
    text = check_requeued_run(cluster, job, log, run, how="batch shell got SIGUSR1", steps=STEPS, timeout=300)
    assert "2 node(s) x 2 task(s)" in text, text
    run_log = (run / "log.txt").read_text()
    placement = "ranks per host: vnode1 0-1, vnode2 2-3; tensor-parallel groups 0-1, 2-3: each within one host"
    assert run_log.count(placement) == 2, run_log  # the first run and the requeued one
    assert "TP 2 x PP 1 x DP 2" in run_log, run_log
    rec = cluster.wait(ref_job, ("COMPLETED",), timeout=300, log=ref_log)
    assert rec["Restarts"] == "0", rec
    assert "ranks per host: vnode3 0-3; tensor-parallel groups 0-1, 2-3" in (ref / "log.txt").read_text()
    for node in cluster.nodes:  # every run exited normally: streaming freed its segments, we our leases and locks
        assert node_shm(cluster, node) == {"segments": [], "leases": {}}, node
        assert not list((cluster.root / node / "tmp").glob("000000_*")), node

    got, want = checkpoint_tensors(run), checkpoint_tensors(ref)
    import torch
    assert got["checkpoint"] == want["checkpoint"] == f"step_{STEPS:07d}"
    assert got.keys() == want.keys() and all(any(k.startswith(p) for k in got) for p in COMPARED), sorted(got)
    differ = [k for k in want if k != "checkpoint" and not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want) - 1} tensors differ from the one-node run, e.g. {differ[:3]}"
    losses = logged_losses(run)
    assert sorted(losses) == list(range(10, STEPS + 1, 10)) and losses == logged_losses(ref)
