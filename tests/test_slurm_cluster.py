"""The one-node SLURM test cluster (tests/slurm_cluster.py): multi-task steps, self-requeue, signals, stop."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, find_binary, parse_job_record, pid_alive


def _wait_for_files(paths: list[Path], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() and p.read_text().strip() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all of {[str(p) for p in paths]} written within {timeout_s} s")
        time.sleep(0.1)  # polling interval: the job writes them when its tasks are ready


def test_parse_job_record_keeps_values_with_spaces_and_equals() -> None:
    record = parse_job_record("JobId=7 JobName=my job JobState=PENDING Reason=BeginTime Restarts=2 "
                              "TRES=cpu=2,node=1 AllocNode:Sid=vm:12")
    assert record == {"JobId": "7", "JobName": "my job", "JobState": "PENDING", "Reason": "BeginTime",
                      "Restarts": "2", "TRES": "cpu=2,node=1", "AllocNode:Sid": "vm:12"}


def test_two_task_job_runs_both_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "tasks.out"
    job_id = slurm_cluster.submit(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        f"#SBATCH --output={out}\n"
        f"srun {sys.executable} -c 'import os; "
        "print(\"task\", os.environ[\"SLURM_PROCID\"], \"of\", os.environ[\"SLURM_NTASKS\"], flush=True)'\n")
    assert slurm_cluster.wait(job_id, timeout_s=60) == "COMPLETED", out.read_text()
    assert sorted(out.read_text().splitlines()) == ["task 0 of 2", "task 1 of 2"]
    assert slurm_cluster.restarts(job_id) == 0


def test_job_requeues_itself_once_and_appends_both_runs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "requeue.out"
    job_id = slurm_cluster.submit(
        "#!/bin/bash\n"
        f"#SBATCH --output={out}\n"
        "#SBATCH --open-mode=append\n"
        'echo "run restart_count=${SLURM_RESTART_COUNT:-unset}"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        '  scontrol requeue "$SLURM_JOB_ID"\n'
        "  sleep 120  # killed by the requeue; reaching the next line would mean it did not happen\n"
        "  echo not-requeued\n"
        "fi\n"
        "echo finished\n")
    # The requeued run may only start cred_expire (10 s) after the first one was stopped.
    assert slurm_cluster.wait(job_id, timeout_s=60) == "COMPLETED", out.read_text()
    assert slurm_cluster.restarts(job_id) == 1
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("slurmstepd")]
    assert lines == ["run restart_count=unset", "run restart_count=1", "finished"]


def test_scancel_signal_reaches_every_task_but_not_the_batch_shell(slurm_cluster: SlurmCluster,
                                                                   tmp_path: Path) -> None:
    # Like `#SBATCH --signal=USR1@90` (no B:), `scancel --signal` without --batch/--full signals the
    # job's steps, i.e. the srun tasks where the trainer runs, and leaves the batch shell alone.
    task_script = (
        f'trap "echo USR1 > {tmp_path}/usr1.$SLURM_PROCID; exit 0" USR1\n'
        f"echo $$ > {tmp_path}/ready.$SLURM_PROCID\n"
        "while true; do sleep 0.1; done\n")
    (tmp_path / "task.sh").write_text(task_script)
    job_id = slurm_cluster.submit(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        f"#SBATCH --output={tmp_path}/signal.out\n"
        f'trap "echo USR1 > {tmp_path}/usr1.batch" USR1\n'
        f"srun bash {tmp_path}/task.sh\n"
        "echo step-done\n")
    _wait_for_files([tmp_path / "ready.0", tmp_path / "ready.1"])
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    assert slurm_cluster.wait(job_id, timeout_s=30) == "COMPLETED", (tmp_path / "signal.out").read_text()
    assert (tmp_path / "usr1.0").read_text() == "USR1\n"
    assert (tmp_path / "usr1.1").read_text() == "USR1\n"
    assert not (tmp_path / "usr1.batch").exists()
    assert (tmp_path / "signal.out").read_text().splitlines()[-1] == "step-done"


@pytest.mark.skipif(find_binary("slurmctld") is None,
                    reason="slurmctld is not installed (apt-get install -y slurm-wlm munge)")
def test_stop_leaves_no_daemon_step_or_task_running(tmp_path: Path) -> None:
    cluster = SlurmCluster().start()
    try:
        pid_file = tmp_path / "task.pid"
        job_id = cluster.submit(f"#!/bin/bash\nsrun bash -c 'echo $$ > {pid_file}; exec sleep 300'\n")
        _wait_for_files([pid_file])
        assert cluster.state(job_id) == "RUNNING"
        task_pid = int(pid_file.read_text())
        daemon_pids = cluster.daemon_pids
        assert sorted(daemon_pids) == ["munged", "slurmctld", "slurmd"]
        running = cluster.cluster_pids()
        assert set(daemon_pids.values()) | {task_pid} <= set(running)
    finally:
        cluster.stop()
    assert [pid for pid in [*daemon_pids.values(), task_pid, *running] if pid_alive(pid)] == []
    assert cluster.cluster_pids() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", cluster.slurmctld_port), timeout=2).close()
    cluster.stop()  # idempotent


@pytest.mark.slow
def test_two_node_cluster_places_tasks_on_both_nodes_with_their_own_address(slurm_two_nodes, tmp_path: Path) -> None:
    from slurm_cluster import NODE_IFNAME

    out = tmp_path / "nodes.out"
    job_id = slurm_two_nodes.submit(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n"
        f"#SBATCH --output={out}\n"
        'echo "batch $SLURMD_NODENAME $SLURM_JOB_NODELIST"\n'
        f"srun {sys.executable} -c 'import os, socket; "
        "print(\"task\", os.environ[\"SLURM_PROCID\"], os.environ[\"SLURM_LOCALID\"], os.environ[\"SLURMD_NODENAME\"], "
        "socket.gethostbyname(os.environ[\"SLURMD_NODENAME\"]), socket.gethostbyname(socket.gethostname()), flush=True)'\n")
    assert slurm_two_nodes.wait(job_id, timeout_s=60) == "COMPLETED", out.read_text()
    lines = out.read_text().splitlines()
    assert "batch node1 node[1-2]" in lines
    addr = {n: slurm_two_nodes.node_addr(n) for n in ("node1", "node2")}
    assert addr["node1"] != addr["node2"]
    # Each task resolves its node's name, and this machine's hostname, to its own node's address.
    assert sorted(ln for ln in lines if ln.startswith("task ")) == [
        f"task 0 0 node1 {addr['node1']} {addr['node1']}", f"task 1 1 node1 {addr['node1']} {addr['node1']}",
        f"task 2 0 node2 {addr['node2']} {addr['node2']}", f"task 3 1 node2 {addr['node2']} {addr['node2']}"]
    assert NODE_IFNAME == "tnet0"


@pytest.mark.slow
def test_two_node_stop_removes_namespaces_bridge_and_hosts_files(tmp_path: Path) -> None:
    from slurm_cluster import MultiNodeSlurmCluster, _ip, multi_node_unavailable

    reason = multi_node_unavailable()
    if reason:
        pytest.skip(f"two-node SLURM cluster unavailable: {reason}")
    cluster = MultiNodeSlurmCluster().start()
    namespaces, bridge = list(cluster.namespaces), cluster.bridge
    assert set(namespaces) <= set(_ip("netns", "list").stdout.split())
    cluster.stop()
    assert not set(namespaces) & set(_ip("netns", "list").stdout.split())
    assert _ip("link", "show", bridge, check=False).returncode != 0
    assert not any(Path("/etc/netns", ns).exists() for ns in namespaces)
    assert cluster.cluster_pids() == []
