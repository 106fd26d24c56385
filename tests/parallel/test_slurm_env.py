"""slurm_rendezvous: torch's env:// variables from SLURM's, on plain dicts (the real srun is in tests/slurm)."""
from __future__ import annotations

import pytest

from sfd_scale.parallel.slurm_env import expand_hostlist, expand_tasks_per_node, slurm_rendezvous


def step_env(**kw) -> dict:
    """What srun gives task 5 of a 2-node x 4-task step of job 123456 (measured variable names)."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "PATH": "/bin"}
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def test_srun_task_gets_torch_variables():
    env = step_env()
    set_ = slurm_rendezvous(env)
    expected = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                "MASTER_PORT": str(15000 + 123456 % 15000)}
    assert set_ == expected and all(env[k] == v for k, v in expected.items()) and env["PATH"] == "/bin"


def test_port_is_per_job_in_range_and_same_for_all_tasks():
    ports = {slurm_rendezvous(step_env(SLURM_PROCID=str(r)))["MASTER_PORT"] for r in range(8)}
    assert len(ports) == 1
    for job in (1, 14999, 15000, 29999, 10 ** 9 + 7):
        port = int(slurm_rendezvous(step_env(SLURM_JOB_ID=str(job)))["MASTER_PORT"])
        assert 15000 <= port < 30000
    assert (slurm_rendezvous(step_env(SLURM_JOB_ID="1"))["MASTER_PORT"]
            != slurm_rendezvous(step_env(SLURM_JOB_ID="2"))["MASTER_PORT"])


def test_existing_launcher_variables_win():
    env = step_env(RANK="3", WORLD_SIZE="4")  # torchrun inside srun: leave everything to it
    before = dict(env)
    assert slurm_rendezvous(env) == {} and env == before
    env = step_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    set_ = slurm_rendezvous(env)
    assert "MASTER_ADDR" not in set_ and "MASTER_PORT" not in set_
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("10.0.0.1", "29500", "5")


def test_not_under_srun_does_nothing():
    assert slurm_rendezvous({"PATH": "/bin"}) == {}
    # the batch script itself: SLURM_PROCID=0 and the job's 8 tasks, but no step: one process
    batch = step_env(SLURM_PROCID="0", SLURM_STEP_ID=None, SLURM_STEP_NUM_TASKS=None,
                     SLURM_STEP_TASKS_PER_NODE=None, SLURM_STEP_NODELIST=None)
    assert slurm_rendezvous(batch) == {} and "RANK" not in batch


def test_step_values_win_over_job_values():
    # a 2-task step inside a 8-task allocation: the step's own counts and first node
    env = step_env(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="gpu08")
    set_ = slurm_rendezvous(env)
    assert (set_["WORLD_SIZE"], set_["LOCAL_WORLD_SIZE"], set_["MASTER_ADDR"]) == ("2", "2", "gpu08")


def test_uneven_tasks_per_node_and_fallbacks():
    env = step_env(SLURM_PROCID="6", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_STEP_NUM_TASKS="7",
                   SLURM_STEP_TASKS_PER_NODE="3(x2),1", SLURM_STEP_NODELIST="n[1-3]", SLURM_NTASKS_PER_NODE=None)
    assert slurm_rendezvous(env)["LOCAL_WORLD_SIZE"] == "1"
    # older srun: no SLURM_STEP_*; job-level variables, and SLURM_NTASKS_PER_NODE without a tasks-per-node list
    env = step_env(SLURM_STEP_NUM_TASKS=None, SLURM_STEP_TASKS_PER_NODE=None, SLURM_STEP_NODELIST=None,
                   SLURM_TASKS_PER_NODE=None, SLURM_STEPID="0", SLURM_STEP_ID=None, SLURM_JOB_NODELIST="a1,b2")
    set_ = slurm_rendezvous(env)
    assert (set_["WORLD_SIZE"], set_["LOCAL_WORLD_SIZE"], set_["MASTER_ADDR"]) == ("8", "4", "a1")


@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("gpu07", ["gpu07"]),
    ("gpu[07-09]", ["gpu07", "gpu08", "gpu09"]),
    ("gpu[098-101,7]", ["gpu098", "gpu099", "gpu100", "gpu101", "gpu7"]),
    ("a[1-2],b,c[3]", ["a1", "a2", "b", "c3"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("node-1.cluster,node-2.cluster", ["node-1.cluster", "node-2.cluster"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8") == [8]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2x3")
