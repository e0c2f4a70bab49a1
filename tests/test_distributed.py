import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from trainer.runtime.distributed import (
    DEFAULT_MASTER_PORT,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    DistConfig,
    DistEnv,
    check_layout,
    detect_env,
    expand_nodelist,
    expand_tasks_per_node,
    format_layout,
    init_process_group,
    is_main_process,
    node_name,
)

ROOT = Path(__file__).resolve().parents[1]

# What torchrun's local elastic agent exports (torch/distributed/elastic/agent/server/local_elastic_agent.py).
TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1", "MASTER_ADDR": "node01", "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "none"}
# What deepspeed/launcher/launch.py exports: no LOCAL_WORLD_SIZE, but LOCAL_SIZE and CROSS_RANK/SIZE.
DEEPSPEED = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
             "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
# A task started by `srun` inside `sbatch --nodes 3 --ntasks-per-node 2` (Slurm env.c, env_array_for_step).
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6",
         "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x3)",
         "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "gpu[07-09]",
         "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_NODELIST": "gpu[07-09]"}


def _without(env, *names):
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize("environ, expected", [
    (TORCHRUN, DistEnv(5, 1, 8, 4, "node01", 29400, "torchrun")),
    (DEEPSPEED, DistEnv(3, 1, 4, 2, "10.0.0.1", 29500, "deepspeed")),
    ({}, DistEnv(0, 0, 1, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single")),
    ({"MASTER_PORT": "31000", "PATH": "/usr/bin"}, DistEnv(0, 0, 1, 1, "127.0.0.1", 31000, "single")),
    # torchrun inside an sbatch allocation: torchrun's variables describe this process.
    ({**SLURM, **TORCHRUN}, DistEnv(5, 1, 8, 4, "node01", 29400, "torchrun")),
    ({**SLURM, **DEEPSPEED}, DistEnv(3, 1, 4, 2, "10.0.0.1", 29500, "deepspeed")),
    # torchrun --nproc_per_node 1 is a one-process torchrun job, not "single".
    ({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"},
     DistEnv(0, 0, 1, 1, "node01", 29400, "torchrun")),
], ids=["torchrun", "deepspeed", "empty", "single-with-port", "torchrun-over-slurm",
        "deepspeed-over-slurm", "torchrun-one-proc"])
def test_detect_env_launchers(environ, expected):
    assert detect_env(environ) == expected


@pytest.mark.parametrize("overrides, drop, expected", [
    # uniform layout: the step's tasks per node, master = first step host, MASTER_PORT honoured
    ({"MASTER_PORT": "23456"}, (), (3, 1, 6, 2, "gpu07", 23456)),
    # only SLURM_NTASKS_PER_NODE (no step / compressed forms)
    ({"MASTER_PORT": "23456"}, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
     (3, 1, 6, 2, "gpu07", 23456)),
    # only the compressed SLURM_TASKS_PER_NODE, heterogeneous: node 2 runs 1 task
    ({"MASTER_PORT": "23456", "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
      "SLURM_NTASKS": "5", "SLURM_STEP_NUM_TASKS": "5", "SLURM_TASKS_PER_NODE": "2(x2),1"},
     ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"), (4, 0, 5, 1, "gpu07", 23456)),
    # heterogeneous step: node 1 of "1,3" runs 3 tasks
    ({"MASTER_PORT": "23456", "SLURM_PROCID": "3", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
      "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1,3"}, (),
     (3, 2, 4, 3, "gpu07", 23456)),
    # the step runs on a subset of the allocation: rank 0 sits on the step's first node
    ({"MASTER_PORT": "23456", "SLURM_STEP_NODELIST": "gpu[08-09],cpu1"}, (),
     (3, 1, 6, 2, "gpu08", 23456)),
    # no step node list: the job's, then the obsolete SLURM_NODELIST
    ({"MASTER_PORT": "23456", "SLURM_JOB_NODELIST": "a-b[3-4]-c[1-2]"}, ("SLURM_STEP_NODELIST",),
     (3, 1, 6, 2, "a-b3-c1", 23456)),
    ({"MASTER_PORT": "23456", "SLURM_NODELIST": "login2,node[1-3]"},
     ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"), (3, 1, 6, 2, "login2", 23456)),
    # an exported MASTER_ADDR wins over the node list
    ({"MASTER_PORT": "23456", "MASTER_ADDR": "10.1.2.3"}, (), (3, 1, 6, 2, "10.1.2.3", 23456)),
    # SLURM_NTASKS when srun's step count is absent
    ({"MASTER_PORT": "23456"}, ("SLURM_STEP_NUM_TASKS",), (3, 1, 6, 2, "gpu07", 23456)),
], ids=["uniform", "ntasks-per-node", "compressed-hetero", "step-hetero", "step-subset",
        "job-nodelist-multibracket", "obsolete-nodelist", "master-addr-env", "ntasks"])
def test_detect_env_slurm(overrides, drop, expected):
    env = detect_env({**_without(SLURM, *drop), **overrides})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.master_addr,
            env.master_port) == expected
    assert env.launcher == "slurm"


def test_slurm_port_is_derived_deterministically_from_job_and_step():
    port = detect_env(SLURM).master_port
    assert SLURM_PORT_BASE <= port < SLURM_PORT_BASE + SLURM_PORT_SPAN
    # every task of the step must agree on it
    other_task = {**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    assert detect_env(other_task).master_port == port
    ports = {detect_env({**SLURM, "SLURM_JOB_ID": str(j)}).master_port for j in range(4000, 4100)}
    assert len(ports) > 90
    assert detect_env({**SLURM, "SLURM_STEP_ID": "1"}).master_port != port


def test_sbatch_script_without_srun_is_a_single_process_with_a_warning():
    batch = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8",
             "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.warns(UserWarning, match="SLURM_NTASKS=8.*not started by srun"):
        env = detect_env(batch)
    assert env == DistEnv(0, 0, 1, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_env({**batch, "SLURM_NTASKS": "1"}).launcher == "single"


@pytest.mark.parametrize("environ, match", [
    ({**TORCHRUN, "RANK": "8"}, r"RANK=8 must be < WORLD_SIZE=8"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, r"LOCAL_RANK=4 must be < LOCAL_WORLD_SIZE=4"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ({**TORCHRUN, "RANK": "-1"}, r"RANK='-1' must be >= 0"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be >= 1"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "16"}, r"LOCAL_WORLD_SIZE=16 must be <= WORLD_SIZE=8"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT='70000' must be in \[1, 65535\]"),
    ({**TORCHRUN, "MASTER_PORT": "http"}, r"MASTER_PORT='http' is not an integer"),
    (_without(TORCHRUN, "LOCAL_WORLD_SIZE"), r"torchrun launch .* LOCAL_WORLD_SIZE is not set"),
    (_without(TORCHRUN, "MASTER_ADDR", "MASTER_PORT"), r"MASTER_ADDR, MASTER_PORT are not set"),
    ({"WORLD_SIZE": "1"}, r"RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set"),
    ({**DEEPSPEED, "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 must be < LOCAL_SIZE=2"),
    ({**DEEPSPEED, "CROSS_RANK": "2"}, r"CROSS_RANK=2 must be < CROSS_SIZE=2"),
    # DeepSpeed's MPI runners export WORLD_SIZE / LOCAL_SIZE but leave RANK to MPI
    (_without(DEEPSPEED, "RANK", "LOCAL_RANK", "CROSS_RANK", "CROSS_SIZE"),
     r"deepspeed launch .* RANK, LOCAL_RANK are not set"),
    ({**SLURM, "SLURM_PROCID": "6"}, r"SLURM_PROCID=6 must be < SLURM_STEP_NUM_TASKS=6"),
    ({**SLURM, "SLURM_LOCALID": "2"}, r"SLURM_LOCALID=2 must be < tasks on this node"),
    ({**SLURM, "SLURM_LOCALID": "x"}, r"SLURM_LOCALID='x' is not an integer"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "2(x)"}, r"SLURM_STEP_TASKS_PER_NODE='2\(x\)'"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "3"},
     r"SLURM_NODEID=3 must be < the node count"),
    (_without({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "2,1"}, "SLURM_NODEID"),
     r"differs between nodes but neither SLURM_STEP_NODEID nor SLURM_NODEID"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "8"}, r"gives 8 tasks on this node, more than"),
    ({**SLURM, "SLURM_STEP_NODELIST": "gpu[07-09"}, r"SLURM_STEP_NODELIST='gpu\[07-09'.*never closed"),
    (_without(SLURM, "SLURM_JOB_ID"), r"without MASTER_PORT or SLURM_JOB_ID"),
    ({**SLURM, "SLURM_JOB_ID": "12a"}, r"SLURM_JOB_ID='12a' is not an integer"),
    (_without(SLURM, "SLURM_LOCALID"), r"SLURM_LOCALID is not set"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_detect_env_rejects_inconsistent_values(environ, match):
    with pytest.raises(ValueError, match=match):
        detect_env(environ)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("node[001-002,010]", ["node001", "node002", "node010"]),
    # each range keeps its own width, as in Slurm's _parse_single_range
    ("node[9,010-011]", ["node9", "node010", "node011"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("gpu-a[1-2]-b[3-4]", ["gpu-a1-b3", "gpu-a1-b4", "gpu-a2-b3", "gpu-a2-b4"]),
    ("r[1-2]n[01-02],login", ["r1n01", "r1n02", "r2n01", "r2n02", "login"]),
    # Three brackets: Slurm's hostlist.c _push_range_list recurses from the right over the prefix,
    # so the middle bracket is the outermost loop and the last one the innermost.
    ("x[1-2]y[3-4]z[5-6]", ["x1y3z5", "x1y3z6", "x2y3z5", "x2y3z6",
                            "x1y4z5", "x1y4z6", "x2y4z5", "x2y4z6"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("10.0.0.1", ["10.0.0.1"]),
    ("node-[5]", ["node-5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "  ", "node[1-2", "node]1", "node[[1]]", "node[3-1]",
                                      "node[a-b]", "node[]", "node[1,]", "[1-2]", "a,,b", "a,",
                                      "node[-1]", "a b", "node[0-99999999]"])
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match=re.escape(f"nodelist {nodelist!r}")):
        expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    assert expand_tasks_per_node("1,3(x2)") == [1, 3, 3]
    with pytest.raises(ValueError, match="'2x3'"):
        expand_tasks_per_node("2x3")


def test_dist_env_validates_fields():
    with pytest.raises(ValueError, match="launcher='mpi'"):
        DistEnv(0, 0, 1, 1, "h", 1, "mpi")
    with pytest.raises(ValueError, match="rank=2 must be in"):
        DistEnv(2, 0, 2, 1, "h", 1, "slurm")
    assert is_main_process(DistEnv(0, 0, 2, 2, "h", 1, "torchrun"))
    assert not is_main_process(DistEnv(1, 1, 2, 2, "h", 1, "torchrun"))


def test_init_process_group_is_a_no_op_for_one_process(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("RANK", raising=False)
    init_process_group(DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single"))
    assert not dist.is_initialized()
    assert "RANK" not in os.environ
    with pytest.raises(ValueError, match="timeout_s=0"):
        init_process_group(DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single"), timeout_s=0)


def test_forced_one_process_group_exports_the_env_and_is_idempotent(monkeypatch):
    import torch
    import torch.distributed as dist

    from trainer.runtime.distributed import destroy_process_group

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "unset")  # restored after the test
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    env = DistEnv(0, 0, 1, 1, "127.0.0.1", _free_loopback_port(), "single")
    init_process_group(env, backend="gloo", timeout_s=30, force=True)
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("0", str(env.master_port))
        init_process_group(env, backend="gloo", force=True)  # already initialized: no-op
        with pytest.raises(ValueError, match="already initialized as rank 0 of 1, not rank 1 of 2"):
            init_process_group(DistEnv(1, 1, 2, 2, "127.0.0.1", env.master_port, "torchrun"),
                               backend="gloo")
        total = torch.tensor([2.0])
        dist.all_reduce(total)
        assert total.item() == 2.0
    finally:
        destroy_process_group()
    assert not dist.is_initialized()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from trainer.runtime.distributed import barrier, destroy_process_group, detect_env, init_process_group

    env = detect_env()
    init_process_group(env, backend="gloo", timeout_s=60)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    barrier()
    with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
        json.dump({"rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
                   "local_world_size": env.local_world_size, "launcher": env.launcher,
                   "sum": total.item(), "group_size": dist.get_world_size()}, f)
    destroy_process_group()
""")


def _worker_env() -> dict[str, str]:
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                     "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars and not k.startswith("SLURM_")}
    # Keep gloo on the loopback interface: nothing leaves 127.0.0.1.
    env.update(PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    return env


def _read_results(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_torchrun_two_process_gloo_all_reduce(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_loopback_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _read_results(tmp_path)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["local_rank"] for r in results] == [0, 1]
    for r in results:
        assert (r["launcher"], r["world_size"], r["local_world_size"], r["group_size"]) == \
            ("torchrun", 2, 2, 2)
        assert r["sum"] == 3.0  # (0 + 1) + (1 + 1)


def test_srun_style_two_process_gloo_all_reduce(tmp_path):
    """Two tasks with the variables srun gives them: detect_env -> derived port -> real gloo init."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    base = {**_worker_env(), "SLURM_JOB_ID": "31337", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(_free_loopback_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = _read_results(tmp_path)
    for r in results:
        assert (r["launcher"], r["world_size"], r["local_world_size"], r["sum"]) == ("slurm", 2, 2, 3.0)


def test_check_layout_refuses_local_ranks_that_repeat_or_skip_on_a_node():
    good = [(0, 0, "node1"), (1, 1, "node1"), (2, 0, "node2"), (3, 1, "node2")]
    check_layout(good)
    assert format_layout(good) == "node1: ranks 0,1 (local 0,1); node2: ranks 2,3 (local 0,1)"
    with pytest.raises(ValueError, match=r"node node2 runs 2 ranks whose local ranks are not 0..1 once each "
                                         r"\(rank 2 local_rank 0, rank 3 local_rank 0\)"):
        check_layout([(0, 0, "node1"), (1, 1, "node1"), (2, 0, "node2"), (3, 0, "node2")])
    with pytest.raises(ValueError, match="node node1 runs 1 ranks"):
        check_layout([(0, 1, "node1")])


def test_node_name_prefers_slurms_name_for_the_node():
    assert node_name({"SLURMD_NODENAME": "gpu-a17"}) == "gpu-a17"
    assert node_name({}) == socket.gethostname()


@pytest.mark.parametrize("value", [0, -5, float("inf"), "soon"])
def test_dist_timeout_must_be_positive_seconds(value):
    with pytest.raises(ValueError, match=re.escape(f"dist.timeout_s={value!r} is invalid; allowed: a number of seconds > 0")):
        DistConfig(timeout_s=value)
