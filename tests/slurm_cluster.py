"""A real one-node SLURM cluster on 127.0.0.1 (munged + slurmctld + slurmd), for tests that submit jobs.

Everything lives in a private tree (``root``): slurm.conf, a fresh munge key, state, spool, pid and
log files. The daemons run in the foreground (``munged -F``, ``slurmctld -D``, ``slurmd -D``) as
children of this process, each in its own session, so their PIDs are known and ``stop()`` kills
exactly them. Client commands find the cluster through ``SLURM_CONF`` in ``cluster.env``; the munge
socket is named in slurm.conf (``AuthInfo=socket=...``), so the system munged is never used.

Typical use (see the ``slurm_cluster`` fixture in conftest.py)::

    with SlurmCluster() as cluster:
        job_id = cluster.submit("#!/bin/bash\\n#SBATCH --ntasks=2\\nsrun hostname\\n")
        assert cluster.wait(job_id) == "COMPLETED"
        subprocess.run(["squeue"], env=cluster.env)

Requires Debian's ``slurm-wlm`` and ``munge`` (22.05) and root (SlurmUser=root).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

LOOPBACK = "127.0.0.1"
# States in which a job stays until slurmctld purges it (MinJobAge after it ended).
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE")
# Daemons live in sbin, which a non-login root shell in CI may not have on PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Inherited variables that would make client commands or jobs believe they run inside another job.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")


def find_binary(name: str) -> str | None:
    """Absolute path of ``name`` on PATH or in the usual sbin folders, or None."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS]))


def slurm_installed() -> bool:
    """True when the SLURM daemons and munge are installed (``apt-get install slurm-wlm munge``)."""
    return all(find_binary(name) for name in ("slurmctld", "slurmd", "munged", "sbatch"))


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the kernel picks it; another process may race us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def short_hostname() -> str:
    """The name slurmd looks itself up by in slurm.conf: gethostname() cut at the first dot."""
    return socket.gethostname().split(".")[0]


def hostname_is_loopback(host: str) -> bool:
    """True when ``host`` resolves to a 127.x address (only then may daemons bind to it)."""
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def parse_job_record(line: str) -> dict[str, str]:
    """``scontrol show job -o`` one-line record -> {key: value}.

    Keys start after whitespace; values run until the next `` Key=`` (so ``TRES=cpu=2,node=1`` and
    values with spaces, such as a JobName, stay whole).
    """
    matches = list(re.finditer(r"(?:^|(?<=\s))([A-Za-z][\w:/.\-]*)=", line))
    record: dict[str, str] = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following is not None else len(line)
        record[match.group(1)] = line[match.end():end].strip()
    return record


def render_slurm_conf(*, root: Path, host: str, slurmctld_port: int, slurmd_port: int, num_cpus: int,
                      real_memory_mb: int, user: str, munge_socket: Path, cred_expire_s: int,
                      bind_loopback_only: bool, controller_addr: str = LOOPBACK,
                      nodes: Sequence[tuple[str, str]] | None = None) -> str:
    """The slurm.conf text of a cluster whose every file is under ``root``.

    ``nodes`` are (NodeName, NodeAddr) pairs, default one node named ``host`` on 127.0.0.1. With
    several nodes each slurmd gets its own spool, pid and log file (``%n``: its node name).
    """
    nodes = list(nodes) if nodes is not None else [(host, LOOPBACK)]
    comm = "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny\n" if bind_loopback_only else ""
    per_node = "-%n" if len(nodes) > 1 else ""
    node_lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={num_cpus} RealMemory={real_memory_mb} "
                         "State=UNKNOWN\n" for name, addr in nodes)
    return (
        f"# {len(nodes)}-node test cluster written by tests/slurm_cluster.py\n"
        "ClusterName=test\n"
        f"SlurmctldHost={host}({controller_addr})\n"
        f"SlurmctldPort={slurmctld_port}\n"
        f"SlurmdPort={slurmd_port}\n"
        # The daemons bind to what the hostname resolves to instead of 0.0.0.0 (only when that is
        # loopback: elsewhere it would move them off 127.0.0.1, where the clients look for them).
        f"{comm}"
        f"SlurmUser={user}\n"
        f"SlurmdUser={user}\n"
        "AuthType=auth/munge\n"
        "CredType=cred/munge\n"
        # cred_expire also sets how long a requeued job waits before it may start again (slurm.conf(5));
        # the default 120 s would make every requeue test wait two minutes. 5 is the minimum.
        f"AuthInfo=socket={munge_socket},cred_expire={cred_expire_s}\n"
        f"StateSaveLocation={root / 'state'}\n"
        f"SlurmdSpoolDir={root / 'spool'}{'/%n' if per_node else ''}\n"
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}\n"
        f"SlurmdPidFile={root / 'run' / f'slurmd{per_node}.pid'}\n"
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}\n"
        f"SlurmdLogFile={root / 'log' / f'slurmd{per_node}.log'}\n"
        "MailProg=/bin/true\n"  # the default /bin/mail is not installed; slurmctld logs an error for it
        "SlurmctldDebug=info\n"
        "SlurmdDebug=info\n"
        "ProctrackType=proctrack/linuxproc\n"
        "TaskPlugin=task/none\n"
        "SelectType=select/cons_tres\n"
        "SelectTypeParameters=CR_CPU\n"
        "SchedulerType=sched/builtin\n"
        # The main scheduling loop runs every sched_interval s (default 60), and only it starts a job
        # that became eligible by time (a requeued job's BeginTime) rather than by an event.
        "SchedulerParameters=sched_interval=1\n"
        "MpiDefault=none\n"
        "AccountingStorageType=accounting_storage/none\n"
        "JobAcctGatherType=jobacct_gather/none\n"
        "JobCompType=jobcomp/none\n"
        # The node's declared CPUs/memory win over what slurmd detects (a 1-CPU runner still gets 2).
        "SlurmdParameters=config_overrides\n"
        "ReturnToService=2\n"
        "JobRequeue=1\n"
        "MaxJobCount=10000\n"
        "KillWait=5\n"
        # Finished jobs stay visible to `scontrol show job` for 5 minutes (no accounting database).
        "MinJobAge=300\n"
        "SlurmctldTimeout=10\n"
        "SlurmdTimeout=30\n"
        "InactiveLimit=0\n"
        f"{node_lines}"
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n"
    )


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except FileNotFoundError:
        return "<no log written>"


def _process_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read()
    except OSError:  # gone, or a kernel thread
        return b""


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # The state is the field after the parenthesised command (which may contain spaces).
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named after this host, all on 127.0.0.1.

    ``start()`` writes the tree, starts the daemons and returns once ``sinfo`` reports the node
    idle. ``stop()`` cancels the jobs, SIGTERMs each daemon's process group (SIGKILL after
    ``stop_timeout_s``), reaps the daemons, then kills any process still carrying this cluster's
    ``SLURM_CONF`` in its environment (slurmstepd and job tasks outlive slurmd by design). It is
    idempotent, and ``cluster_pids()`` is empty afterwards. Without ``root_dir`` the tree is a fresh
    temporary folder that ``stop()`` deletes (kept when ``start()`` failed, for its logs).
    """

    def __init__(self, *, root_dir: str | os.PathLike[str] | None = None, num_cpus: int | None = None,
                 real_memory_mb: int = 1024, cred_expire_s: int = 10, start_timeout_s: float = 60.0,
                 stop_timeout_s: float = 10.0) -> None:
        if cred_expire_s < 5:
            raise ValueError(f"cred_expire_s={cred_expire_s}: slurm ignores values below 5 (uses 120)")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus={num_cpus}: must be >= 1")
        self.root = Path(root_dir) if root_dir is not None else Path(tempfile.mkdtemp(prefix="slurm_cluster_"))
        # A tree we created is removed by stop(), unless start() failed: then its logs explain why.
        self._remove_root_on_stop = root_dir is None
        self.host = short_hostname()
        self.controller_addr = LOOPBACK
        self.nodes: list[tuple[str, str]] = [(self.host, LOOPBACK)]
        """(NodeName, NodeAddr) of each node, in slurm.conf order."""
        self.num_cpus = num_cpus if num_cpus is not None else max(2, len(os.sched_getaffinity(0)))
        self.real_memory_mb = real_memory_mb
        self.cred_expire_s = cred_expire_s
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.conf_path = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.job_dir = self.root / "jobs"
        self.slurmctld_port = 0
        self.slurmd_port = 0
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._num_scripts = 0
        base = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV_PREFIXES)}
        sbin = [d for d in _SBIN_DIRS if d not in base.get("PATH", "").split(os.pathsep)]
        base["PATH"] = os.pathsep.join([base.get("PATH", "/usr/bin:/bin"), *sbin])
        base["SLURM_CONF"] = str(self.conf_path)
        self.env: dict[str, str] = base
        """Environment for every subprocess that should talk to this cluster (sbatch, squeue, ...)."""

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        if self.processes:
            raise RuntimeError(f"SlurmCluster in {self.root} already started")
        # Daemons outlive this process unless stopped: a test run that ends without stop() must not
        # leave a cluster behind.
        atexit.register(self.stop)
        missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch") if find_binary(n) is None]
        if missing:
            raise FileNotFoundError(f"{missing} not found: apt-get install -y slurm-wlm munge")
        try:
            self._write_tree()
            self._start_munged()
            self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-f", str(self.conf_path)])  # type: ignore[list-item]
            self._start_slurmds()
            self._wait_until_idle()
        except BaseException:
            self._remove_root_on_stop = False
            self.stop()
            raise
        return self

    def _start_slurmds(self) -> None:
        self._spawn("slurmd", [find_binary("slurmd"), "-D", "-f", str(self.conf_path)])  # type: ignore[list-item]

    def _write_tree(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # 0755: munged refuses a socket whose directory (and every ancestor) is not executable by all.
        os.chmod(self.root, 0o755)
        for sub in ("state", "spool", "run", "log", "jobs"):
            (self.root / sub).mkdir(exist_ok=True)
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            # 1024 random bits, readable by the owner only: munged rejects a group/other-readable key.
            tmp = self.munge_dir / ".munge.key.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(128))
            os.replace(tmp, key)
        self.slurmctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.slurmctld_port:
            self.slurmd_port = free_port()
        text = render_slurm_conf(
            root=self.root, host=self.host, slurmctld_port=self.slurmctld_port,
            slurmd_port=self.slurmd_port, num_cpus=self.num_cpus, real_memory_mb=self.real_memory_mb,
            user=pwd.getpwuid(os.getuid()).pw_name, munge_socket=self.munge_socket,
            cred_expire_s=self.cred_expire_s, bind_loopback_only=self._bind_loopback_only(),
            controller_addr=self.controller_addr, nodes=self.nodes)
        _write_atomic(self.conf_path, text, 0o644)

    def _bind_loopback_only(self) -> bool:
        return hostname_is_loopback(self.host)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.log_dir / f"{name}.out", "ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.root, start_new_session=True,  # own process group: stop() kills exactly it
            )

    def _start_munged(self) -> None:
        munged = find_binary("munged")
        assert munged is not None
        self._spawn("munged", [
            munged, "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={self.munge_dir / 'munge.key'}", f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}", f"--log-file={self.log_dir / 'munged.log'}",
        ])
        deadline = time.monotonic() + self.start_timeout_s
        while not self.munge_socket.exists():
            self._check_daemons_alive("munged did not create its socket")
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket} within "
                                   f"{self.start_timeout_s} s\n{self.log_tails()}")
            time.sleep(0.05)  # polling interval for the socket file

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while True:
            self._check_daemons_alive("a daemon exited before the node became idle")
            result = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout_s=15)
            last = (result.stdout + result.stderr).strip()
            states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
            if result.returncode == 0 and states == {name: "idle" for name, _ in self.nodes}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {[n for n, _ in self.nodes]} not idle within {self.start_timeout_s} s "
                                   f"(sinfo: {last!r})\n{self.log_tails()}")
            time.sleep(0.2)  # polling interval for slurmd's registration

    def _check_daemons_alive(self, what: str) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"{what}: exit codes {dead}\n{self.log_tails()}")

    def stop(self) -> None:
        """Cancel jobs, stop slurmd, slurmctld and munged by PID, kill leftovers. Idempotent."""
        atexit.unregister(self.stop)
        ctld = self.processes.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.cancel_all_jobs()
        # slurmd first (each node's), munged last: the others talk to it on the way out.
        names = [n for n in self.processes if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in names:
            process = self.processes.get(name)
            if process is not None:
                self._terminate(process)
        self._kill_leftovers()
        self._after_stop()
        if self._remove_root_on_stop and self.root.exists():
            shutil.rmtree(self.root)

    def _after_stop(self) -> None:
        """Called by ``stop()`` once no process of the cluster is left (the network goes here)."""

    def cancel_all_jobs(self) -> None:
        """scancel every queued job and wait (KillWait + stop_timeout_s at most) until the queue is
        empty, so slurmd ends the steps itself; whatever survives is killed by ``_kill_leftovers``."""
        try:
            listed = self.run("squeue", "-h", "-o", "%i", check=False, timeout_s=15)
            job_ids = listed.stdout.split()
            if listed.returncode != 0 or not job_ids:
                return
            self.run("scancel", *job_ids, check=False, timeout_s=15)
            deadline = time.monotonic() + 5 + self.stop_timeout_s  # 5: KillWait in slurm.conf
            while time.monotonic() < deadline:
                running = self.run("squeue", "-h", "-o", "%i", check=False, timeout_s=15)
                if running.returncode != 0 or not running.stdout.split():
                    return
                time.sleep(0.2)  # polling interval for the cancelled jobs to leave the queue
        except subprocess.TimeoutExpired as exc:
            warnings.warn(f"slurmctld in {self.root} did not answer {exc.cmd} within {exc.timeout} s; "
                          "killing the cluster's processes instead of cancelling its jobs")

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        pgid = process.pid  # start_new_session=True made the daemon a group leader
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                continue
        process.wait()
        try:  # children left in the group (slurmctld's slurmscriptd) go with it
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _kill_leftovers(self) -> None:
        deadline = time.monotonic() + self.stop_timeout_s
        sig = signal.SIGTERM
        while True:
            pids = self.cluster_pids()
            if not pids:
                return
            if time.monotonic() > deadline:
                if sig == signal.SIGKILL:
                    raise RuntimeError(f"processes of the cluster in {self.root} survive SIGKILL: {pids}")
                sig, deadline = signal.SIGKILL, time.monotonic() + self.stop_timeout_s
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)  # polling interval for the signalled processes to exit

    def cluster_pids(self) -> list[int]:
        """PIDs of live processes whose environment holds this cluster's SLURM_CONF (daemons,
        slurmstepd, job tasks; a job submitted with --export=NONE escapes this), zombies excluded."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        own = {os.getpid(), os.getppid()}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in own:
                continue
            pid = int(entry)
            if marker in _process_environ(pid).split(b"\0") and pid_alive(pid):
                found.append(pid)
        return sorted(found)

    @property
    def daemon_pids(self) -> dict[str, int]:
        """{"munged": pid, "slurmctld": pid, "slurmd": pid} of the daemons started (running or not);
        a multi-node cluster names each node's ``slurmd-<node>``."""
        return {name: p.pid for name, p in self.processes.items()}

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- clients ---------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout_s: float = 30.0,
            cwd: str | os.PathLike[str] | None = None, input_text: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``sinfo``, ``scontrol``, ...) against this cluster, output captured.

        With ``check`` a non-zero exit raises RuntimeError carrying the command's stderr.
        """
        result = subprocess.run(list(args), env=self.env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout_s, input=input_text,
                                stdin=None if input_text is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: "
                               f"{(result.stderr or result.stdout).strip()}")
        return result

    def submit(self, script: str | os.PathLike[str], *sbatch_args: str,
               cwd: str | os.PathLike[str] | None = None) -> int:
        """``sbatch --parsable [sbatch_args] script`` -> job id.

        ``script`` is a path, or the script's text when it is a ``str`` starting with ``#!`` (then
        written to ``<root>/jobs/``). The job's working directory is ``cwd`` (default
        ``<root>/jobs``), which is where relative ``--output`` names land.
        """
        if isinstance(script, str) and script.startswith("#!"):
            self._num_scripts += 1
            path = self.job_dir / f"script_{self._num_scripts}.sh"
            _write_atomic(path, script, 0o755)
        else:
            path = Path(script)
            if not path.is_file():
                raise FileNotFoundError(f"job script {path} does not exist (text must start with '#!')")
        result = self.run("sbatch", "--parsable", *sbatch_args, str(path),
                          cwd=cwd if cwd is not None else self.job_dir)
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """The job's ``scontrol show job -o`` record as {key: value}. LookupError once it is purged."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0 or not result.stdout.strip():
            raise LookupError(f"job {job_id} unknown to the cluster in {self.root} (never submitted, or "
                              f"purged MinJobAge after it ended): {result.stderr.strip()}")
        return parse_job_record(result.stdout.strip().splitlines()[0])

    def state(self, job_id: int) -> str:
        """JobState, e.g. "PENDING", "RUNNING", "COMPLETED"."""
        return self.job_info(job_id)["JobState"]

    def restarts(self, job_id: int) -> int:
        """How many times the job was requeued (the job sees it as SLURM_RESTART_COUNT)."""
        return int(self.job_info(job_id)["Restarts"])

    def wait(self, job_id: int, states: Iterable[str] = TERMINAL_STATES, timeout_s: float = 60.0) -> str:
        """Poll until the job's state is one of ``states``; return it. TimeoutError otherwise."""
        wanted = set(states)
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job_info(job_id)
            if info["JobState"] in wanted:
                return info["JobState"]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {info['JobState']} (Reason={info.get('Reason')}) after "
                    f"{timeout_s} s, waiting for {sorted(wanted)}\n{self.log_tails()}")
            time.sleep(0.2)  # polling interval: scontrol has no blocking wait for a state

    def log_tails(self, num_chars: int = 3000) -> str:
        """The end of each daemon's output, for error messages."""
        parts = []
        slurmd_logs = sorted(p.name for p in self.log_dir.glob("slurmd*")) or ["slurmd.out", "slurmd.log"]
        for name in ("munged.out", "slurmctld.out", *slurmd_logs):
            parts.append(f"--- {self.log_dir / name} ---\n{_tail(self.log_dir / name, num_chars)}")
        return "\n".join(parts)


# ----------------------------------------------------------------------------- several nodes

# The interface each node's namespace gets: what a job sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to.
NODE_IFNAME = "tnet0"
# Node subnets are 10.NET_OCTET.X.0/24, X chosen per cluster among those no local interface holds.
NET_OCTET = 219
_NETNS_DIR = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = find_binary("ip")
    if ip is None:
        raise FileNotFoundError("`ip` not found: apt-get install -y iproute2")
    result = subprocess.run([ip, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def multi_node_unavailable() -> str | None:
    """Why a MultiNodeSlurmCluster cannot run here (no root, no ``ip``, no network namespaces, no
    SLURM), or None when it can."""
    if not slurm_installed():
        return "SLURM is not installed (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "network namespaces and SlurmUser=root need root"
    if find_binary("ip") is None:
        return "`ip` is not installed (apt-get install -y iproute2)"
    probe = f"slurm-probe-{os.getpid()}"
    added = _ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"cannot create a network namespace (ip netns add: {added.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    return None


class MultiNodeSlurmCluster(SlurmCluster):
    """``num_nodes`` SLURM nodes on this machine, one ``slurmd`` per Linux network namespace.

    The Debian build lacks ``--enable-multiple-slurmd``, so the nodes are told apart by network
    rather than by port: a bridge in this (the host's) namespace holds slurmctld's address
    10.219.X.1, and a veth pair links it to each node's namespace (``ip netns``), where the node has
    its own address 10.219.X.(i+1) on interface ``NODE_IFNAME``. Each slurmd runs through
    ``nsenter --net`` with ``-N node<i>``, in a private mount table where ``/etc/netns/<ns>/hosts`` is
    bind-mounted over /etc/hosts for the node and everything it starts (as ``ip netns exec`` does), so ``node1``/``node2`` resolve there (as DNS
    would on a real cluster) and this machine's hostname resolves to the node's own address. Jobs
    therefore meet the real multi-node problems: the rendezvous at the first node's address, a
    socket interface to choose, peers that can die. munged and the files stay shared (one
    filesystem, as with NFS). ``stop()`` kills the processes by PID as the one-node cluster does,
    then deletes the namespaces, the bridge and the hosts files it created, nothing else.
    """

    def __init__(self, num_nodes: int = 2, **kwargs) -> None:
        if num_nodes < 2:
            raise ValueError(f"num_nodes={num_nodes}: use SlurmCluster for one node")
        super().__init__(**kwargs)
        self.num_nodes = num_nodes
        tag = os.urandom(3).hex()  # interface names are at most 15 characters
        self.bridge = f"sb{tag}"
        self.namespaces = [f"slurm-{tag}-n{i}" for i in range(1, num_nodes + 1)]
        self._host_veths = [f"sv{tag}{i}" for i in range(1, num_nodes + 1)]
        self._created: list[tuple[str, str]] = []  # ("netns"|"link"|"hosts", name), for teardown

    @property
    def node_names(self) -> list[str]:
        return [name for name, _ in self.nodes]

    def node_addr(self, node: str) -> str:
        return dict(self.nodes)[node]

    def _bind_loopback_only(self) -> bool:
        return False  # every daemon has its own namespace; 0.0.0.0 there is the node's address

    def _free_subnet(self) -> int:
        held = _ip("-o", "-4", "addr", "show").stdout
        used = {int(m) for m in re.findall(rf"inet 10\.{NET_OCTET}\.(\d+)\.", held)}
        free = [x for x in range(1, 255) if x not in used]
        if not free:
            raise RuntimeError(f"every 10.{NET_OCTET}.X.0/24 is held by an interface here")
        return free[int.from_bytes(os.urandom(2), "big") % len(free)]

    def _write_tree(self) -> None:
        self._build_network()
        super()._write_tree()

    def _build_network(self) -> None:
        net = f"10.{NET_OCTET}.{self._free_subnet()}"
        self.controller_addr = f"{net}.1"
        self.nodes = [(f"node{i}", f"{net}.{i + 1}") for i in range(1, self.num_nodes + 1)]
        _ip("link", "add", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        _ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hostname = socket.gethostname()
        for ns, veth, (node, addr) in zip(self.namespaces, self._host_veths, self.nodes):
            _ip("netns", "add", ns)
            self._created.append(("netns", ns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
            self._created.append(("link", veth))
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IFNAME)
            _ip("-n", ns, "link", "set", NODE_IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = _NETNS_DIR / ns
            etc.mkdir(parents=True, exist_ok=True)
            self._created.append(("hosts", str(etc)))
            lines = ["127.0.0.1 localhost", f"{addr} {hostname}",  # gethostname() -> this node's address
                     f"{self.controller_addr} slurmctld",
                     *(f"{a} {n}" for n, a in self.nodes)]
            _write_atomic(etc / "hosts", "\n".join(lines) + "\n", 0o644)

    def _start_slurmds(self) -> None:
        tools = {n: find_binary(n) for n in ("nsenter", "unshare", "mount", "slurmd")}
        missing = [n for n, path in tools.items() if path is None]
        if missing:
            raise FileNotFoundError(f"{missing} not found: apt-get install -y util-linux mount slurm-wlm")
        for ns, (node, _) in zip(self.namespaces, self.nodes):
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            # Not `ip netns exec`: it remounts /sys, which hides the cgroup filesystem slurmd needs.
            # nsenter enters the node's network, unshare gives it a private mount table (so the hosts
            # file is the node's alone), and each of them and the shell exec the next: slurmd keeps the PID.
            script = (f"mount --bind {shlex.quote(str(_NETNS_DIR / ns / 'hosts'))} /etc/hosts && "
                      f"exec {shlex.quote(tools['slurmd'])} -D -N {node} -f {shlex.quote(str(self.conf_path))}")
            self._spawn(f"slurmd-{node}", [tools["nsenter"], f"--net=/run/netns/{ns}", "--",
                                           tools["unshare"], "--mount", "--propagation", "slave", "--",
                                           "/bin/sh", "-c", script])

    def _after_stop(self) -> None:
        errors = []
        for kind, name in reversed(self._created):
            if kind == "hosts":
                shutil.rmtree(name, ignore_errors=True)
                continue
            # Deleting a namespace destroys its end of the veth pair, which takes the host end along.
            result = _ip("netns", "del", name, check=False) if kind == "netns" else _ip("link", "del", name, check=False)
            if result.returncode != 0 and "Cannot find device" not in result.stderr:
                errors.append(f"{kind} {name}: {result.stderr.strip()}")
        self._created.clear()
        if errors:
            warnings.warn(f"MultiNodeSlurmCluster in {self.root}: could not remove {errors}")

    def task_pids(self, job_id: int | str, node: str) -> list[int]:
        """PIDs of the job's step tasks (and their children) running on ``node``; not slurmstepd, not
        the batch script."""
        found = []
        for pid in self.cluster_pids():
            env = dict(item.split(b"=", 1) for item in _process_environ(pid).split(b"\0") if b"=" in item)
            if (env.get(b"SLURM_JOB_ID") == str(job_id).encode() and env.get(b"SLURMD_NODENAME") == node.encode()
                    and env.get(b"SLURM_STEP_ID", b"").isdigit() and b"SLURM_PROCID" in env):
                found.append(pid)
        return found
