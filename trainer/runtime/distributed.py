"""The one place that maps launcher environments to rank, world size and the process group.

Every other module receives ``rank`` and ``world_size`` as arguments (STYLE.md rule 5; modelled on
open_clip's ``distributed.py``). Supported launchers, in order of precedence:

* ``torchrun`` (torch elastic): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``.
* the DeepSpeed launcher (``deepspeed`` / ``deepspeed.launcher.launch``, also behind its pdsh
  runner): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` like torchrun,
  but the per-node process count is ``LOCAL_SIZE`` (it never sets ``LOCAL_WORLD_SIZE``) and it adds
  ``CROSS_RANK`` / ``CROSS_SIZE`` (node index / node count), which is how it is told apart.
* SLURM tasks started by ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``, the step's task count and
  tasks per node, the step's node list).
* otherwise a single process.

Explicit torchrun / DeepSpeed variables win over SLURM's, so ``torchrun`` inside an ``sbatch``
allocation describes the torchrun workers, not the allocation.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.checks import invalid, is_float

log = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "deepspeed", "slurm", "single")

# torch.distributed's conventional default (torchrun, deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT).
DEFAULT_MASTER_PORT = 29500
# Ports derived from the SLURM job id fall in [20000, 32000): unprivileged and below Linux's default
# ephemeral range (net.ipv4.ip_local_port_range starts at 32768), so an outgoing connection on the
# master node cannot already hold the port.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000

_DEEPSPEED_MARKERS = ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
_EXPLICIT_MARKERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Set by srun for every task it starts (Slurm src/common/env.c, env_array_for_step); an sbatch
# script itself only sees the allocation's SLURM_NTASKS / SLURM_PROCID=0.
_SRUN_MARKERS = ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")


@dataclass
class DistConfig:
    """How the ranks of a job wait for each other (``dist.*``)."""

    # How long a rank waits in one collective (all-reduce, barrier, the rendezvous) before it raises
    # instead of waiting forever for a peer that died, hangs or cannot be reached; srun
    # --kill-on-bad-exit then ends the whole job (slurm/train.sbatch). It must exceed the longest
    # legitimate wait: the other ranks wait while rank 0 writes a checkpoint or converts one to the
    # universal format, and while a slow node catches up.
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not is_float(self.timeout_s) or self.timeout_s <= 0:
            raise invalid("dist.timeout_s", self.timeout_s, "a number of seconds > 0")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global and per-node rank / size, rendezvous address."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r}; allowed: {', '.join(LAUNCHERS)}")
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(f"local_world_size={self.local_world_size} must be in "
                             f"[1, world_size={self.world_size}]")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local_rank={self.local_rank} must be in "
                             f"[0, local_world_size={self.local_world_size})")
        if not self.master_addr:
            raise ValueError("master_addr='' must name the host of rank 0")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port={self.master_port} must be in [1, 65535]")


def _int_var(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = environ[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _first_present(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in environ), None)


def _require(environ: Mapping[str, str], names: tuple[str, ...], launcher: str) -> None:
    missing = [n for n in names if n not in environ]
    if missing:
        present = {n: environ[n] for n in names if n in environ}
        raise ValueError(f"{launcher} launch detected ({present}) but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set; "
                         f"a {launcher} launch sets all of {', '.join(names)}")


def _check_below(name: str, value: int, bound_name: str, bound: int) -> None:
    if value >= bound:
        raise ValueError(f"{name}={value} must be < {bound_name}={bound}")


def _port(environ: Mapping[str, str], name: str) -> int:
    port = _int_var(environ, name, minimum=1)
    if port > 65535:
        raise ValueError(f"{name}={environ[name]!r} must be in [1, 65535]")
    return port


def _detect_explicit(environ: Mapping[str, str]) -> DistEnv:
    if any(n in environ for n in _DEEPSPEED_MARKERS) and "LOCAL_WORLD_SIZE" not in environ:
        launcher, local_size_var = "deepspeed", "LOCAL_SIZE"
        required = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    else:
        launcher, local_size_var = "torchrun", "LOCAL_WORLD_SIZE"
        required = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")
    _require(environ, required, launcher)
    world_size = _int_var(environ, "WORLD_SIZE", minimum=1)
    rank = _int_var(environ, "RANK")
    local_world_size = _int_var(environ, local_size_var, minimum=1)
    local_rank = _int_var(environ, "LOCAL_RANK")
    _check_below("RANK", rank, "WORLD_SIZE", world_size)
    _check_below("LOCAL_RANK", local_rank, local_size_var, local_world_size)
    if local_world_size > world_size:
        raise ValueError(f"{local_size_var}={local_world_size} must be <= WORLD_SIZE={world_size}")
    if launcher == "deepspeed" and "CROSS_RANK" in environ and "CROSS_SIZE" in environ:
        _check_below("CROSS_RANK", _int_var(environ, "CROSS_RANK"), "CROSS_SIZE",
                     _int_var(environ, "CROSS_SIZE", minimum=1))
    master_addr = environ["MASTER_ADDR"].strip()
    if not master_addr:
        raise ValueError("MASTER_ADDR='' must name the host of rank 0")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size,
                   local_world_size=local_world_size, master_addr=master_addr,
                   master_port=_port(environ, "MASTER_PORT"), launcher=launcher)


_TASKS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def expand_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node form: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    This is the format of ``SLURM_TASKS_PER_NODE`` / ``SLURM_STEP_TASKS_PER_NODE`` (Slurm
    ``uint16_array_to_str``: a count, optionally followed by ``(xN)`` for N consecutive nodes).
    """
    counts: list[int] = []
    for item in value.split(","):
        match = _TASKS_ITEM.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"tasks per node {value!r}: item {item!r} is not COUNT or COUNT(xREPEAT)")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        if repeat < 1:
            raise ValueError(f"tasks per node {value!r}: repeat in {item!r} must be >= 1")
        counts.extend([count] * repeat)
    return counts


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    if "MASTER_PORT" in environ:
        return _port(environ, "MASTER_PORT")
    if "SLURM_JOB_ID" not in environ and "SLURM_JOBID" not in environ:
        raise ValueError("SLURM launch without MASTER_PORT or SLURM_JOB_ID to derive it from; "
                         "export MASTER_PORT in the job script")
    job_var = "SLURM_JOB_ID" if "SLURM_JOB_ID" in environ else "SLURM_JOBID"
    job_id = _int_var(environ, job_var)
    step_var = _first_present(environ, ("SLURM_STEP_ID", "SLURM_STEPID"))
    step_id = _int_var(environ, step_var) if step_var else 0
    # Every task of a step computes the same port; the step id keeps concurrent steps of one job
    # (several backgrounded srun calls) from colliding on the same first node.
    return SLURM_PORT_BASE + zlib.crc32(f"{job_id}.{step_id}".encode()) % SLURM_PORT_SPAN


def _detect_slurm(environ: Mapping[str, str]) -> DistEnv:
    world_var = _first_present(environ, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    if world_var is None:
        raise ValueError("SLURM launch (SLURM_PROCID set) but none of SLURM_STEP_NUM_TASKS, "
                         "SLURM_NTASKS, SLURM_NPROCS is set")
    world_size = _int_var(environ, world_var, minimum=1)
    rank = _int_var(environ, "SLURM_PROCID")
    _check_below("SLURM_PROCID", rank, world_var, world_size)
    _require(environ, ("SLURM_PROCID", "SLURM_LOCALID"), "SLURM")
    local_rank = _int_var(environ, "SLURM_LOCALID")

    # The step's layout first: srun -n may run fewer tasks than the allocation holds, and
    # srun --preserve-env keeps the allocation's SLURM_TASKS_PER_NODE.
    tpn_var = _first_present(environ, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
                                       "SLURM_TASKS_PER_NODE"))
    if tpn_var is None:
        raise ValueError("SLURM launch but none of SLURM_STEP_TASKS_PER_NODE, "
                         "SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE is set")
    try:
        tasks_per_node = expand_tasks_per_node(environ[tpn_var])
    except ValueError as err:
        raise ValueError(f"{tpn_var}={environ[tpn_var]!r}: {err}") from None
    if len(set(tasks_per_node)) == 1:
        local_world_size = tasks_per_node[0]
    else:
        node_var = _first_present(environ, ("SLURM_STEP_NODEID", "SLURM_NODEID"))
        if node_var is None:
            raise ValueError(f"{tpn_var}={environ[tpn_var]!r} differs between nodes but neither "
                             "SLURM_STEP_NODEID nor SLURM_NODEID says which node this is")
        node_id = _int_var(environ, node_var)
        _check_below(node_var, node_id, f"the node count of {tpn_var}={environ[tpn_var]!r}",
                     len(tasks_per_node))
        local_world_size = tasks_per_node[node_id]
    if local_world_size < 1:
        raise ValueError(f"{tpn_var}={environ[tpn_var]!r} gives {local_world_size} tasks on this node")
    _check_below("SLURM_LOCALID", local_rank, f"tasks on this node ({tpn_var}={environ[tpn_var]!r})",
                 local_world_size)
    if local_world_size > world_size:
        raise ValueError(f"{tpn_var}={environ[tpn_var]!r} gives {local_world_size} tasks on this "
                         f"node, more than {world_var}={world_size}")

    if environ.get("MASTER_ADDR", "").strip():
        master_addr = environ["MASTER_ADDR"].strip()
    else:
        # Rank 0 runs on the step's first node under srun's block, cyclic and plane distributions.
        list_var = _first_present(environ, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                            "SLURM_NODELIST"))
        if list_var is None:
            raise ValueError("SLURM launch without MASTER_ADDR and without SLURM_STEP_NODELIST, "
                             "SLURM_JOB_NODELIST or SLURM_NODELIST to take the first host from")
        try:
            master_addr = expand_nodelist(environ[list_var])[0]
        except ValueError as err:
            raise ValueError(f"{list_var}={environ[list_var]!r}: {err}") from None
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size,
                   local_world_size=local_world_size, master_addr=master_addr,
                   master_port=_slurm_master_port(environ), launcher="slurm")


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read rank, local rank, world size and rendezvous address from the launcher's variables.

    Precedence: torchrun / DeepSpeed-launcher variables, then SLURM tasks started by ``srun``, then
    a single process. A SLURM batch script that runs Python without ``srun`` is a single process
    (the allocation's ``SLURM_NTASKS`` does not describe it; a warning says so). Values that
    contradict each other (rank >= world size, local rank >= local world size) or are not
    integers raise ``ValueError`` naming the variable and its value.
    """
    if any(n in environ for n in _EXPLICIT_MARKERS):
        return _detect_explicit(environ)
    if "SLURM_PROCID" in environ:
        if any(n in environ for n in _SRUN_MARKERS):
            return _detect_slurm(environ)
        ntasks = environ.get("SLURM_NTASKS", "1")
        if ntasks.strip() != "1":
            warnings.warn(f"SLURM_NTASKS={ntasks} but this process was not started by srun "
                          f"(none of {', '.join(_SRUN_MARKERS)} is set): running as a single "
                          "process; start the training script with srun or torchrun to use the "
                          "allocation", stacklevel=2)
    master_port = _port(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                   master_addr="127.0.0.1", master_port=master_port, launcher="single")


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
# Slurm's hostlist.c refuses larger ranges too (MAX_RANGE); a typo must not allocate millions of names.
_MAX_RANGE = 1 << 16


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]``; the width of the low bound sets zero padding."""
    numbers: list[str] = []
    for part in body.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ValueError(f"nodelist {nodelist!r}: range {part!r} in [{body}] is not N or N-M")
        lo_text, hi_text = match.group(1), match.group(2)
        lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
        if lo > hi:
            raise ValueError(f"nodelist {nodelist!r}: range {part!r} runs backwards")
        if hi - lo >= _MAX_RANGE:
            raise ValueError(f"nodelist {nodelist!r}: range {part!r} names more than {_MAX_RANGE} hosts")
        numbers.extend(f"{n:0{len(lo_text)}d}" for n in range(lo, hi + 1))
    return numbers


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas that separate hosts (commas inside brackets separate ranges)."""
    tokens, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            if depth:
                raise ValueError(f"nodelist {nodelist!r}: nested '['")
            depth = 1
        elif char == "]":
            if not depth:
                raise ValueError(f"nodelist {nodelist!r}: ']' without '['")
            depth = 0
        elif char == "," and not depth:
            tokens.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"nodelist {nodelist!r}: '[' is never closed")
    tokens.append(nodelist[start:])
    return tokens


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _expand_token(token: str, nodelist: str) -> list[str]:
    # Slurm (src/common/hostlist.c, _push_range_list) takes the last bracket as the innermost loop
    # and expands the prefix's brackets recursively from the right, each new one outermost; for two
    # brackets that is the plain cartesian product a[1-2]-b[3-4] -> a1-b3, a1-b4, a2-b3, a2-b4.
    brackets = list(_BRACKET.finditer(token))
    if not brackets:
        return [token]
    last = brackets[-1]
    inner = _expand_ranges(last.group(1), nodelist)
    suffix = token[last.end():]
    return _expand_prefix(token[:last.start()], inner, suffix, nodelist)


def _expand_prefix(prefix: str, inner: list[str], suffix: str, nodelist: str) -> list[str]:
    brackets = list(_BRACKET.finditer(prefix))
    if not brackets:
        return [f"{prefix}{n}{suffix}" for n in inner]
    last = brackets[-1]
    head, tail = prefix[:last.start()], prefix[last.end():]
    hosts: list[str] = []
    for number in _expand_ranges(last.group(1), nodelist):
        hosts.extend(_expand_prefix(f"{head}{number}{tail}", inner, suffix, nodelist))
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM compressed host list, e.g. ``node[01-04,07]`` or ``a1,b[2-3],c``.

    Reference semantics: ``scontrol show hostnames <nodelist>`` (Slurm ``src/common/hostlist.c``).
    This pure-Python version exists because ``scontrol`` is not on every compute image. Hosts are
    separated by commas outside brackets; ``[...]`` holds comma-separated numbers and
    ``lo-hi`` ranges; the low bound's width sets zero padding (``[08-11]`` -> ``08 09 10 11``);
    several brackets in one host expand as in Slurm (for two: first bracket outermost); a suffix
    after the last bracket (``n[1-2]-ib``), which Slurm never writes, expands as well. Malformed
    input (unbalanced or nested brackets, empty names, non-numeric or backwards ranges) raises
    ``ValueError`` naming the string.
    """
    if not nodelist or not nodelist.strip():
        raise ValueError(f"nodelist {nodelist!r} is empty")
    hosts: list[str] = []
    for token in _split_top_level(nodelist.strip()):
        if not token:
            raise ValueError(f"nodelist {nodelist!r}: empty host name between commas")
        if any(c.isspace() for c in token):
            raise ValueError(f"nodelist {nodelist!r}: whitespace inside host {token!r}")
        if token.startswith("["):
            raise ValueError(f"nodelist {nodelist!r}: host {token!r} has no name before '['")
        hosts.extend(_expand_token(token, nodelist))
    return hosts


def node_name(environ: Mapping[str, str] = os.environ) -> str:
    """The node this process runs on: SLURM's name for it (``SLURMD_NODENAME``), else the hostname."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def rank_layout(env: DistEnv, node: str) -> list[tuple[int, int, str]]:
    """``(rank, local_rank, node)`` of every rank, in rank order (one all-gather at start-up), checked:
    on each node the local ranks must be 0..n-1 once each, else two ranks would share a GPU or a
    node-local file (the classic wrong-``LOCAL_RANK`` launch)."""
    layout = [tuple(item) for item in all_gather_object((env.rank, env.local_rank, node))]
    check_layout(layout)
    return layout  # type: ignore[return-value]


def check_layout(layout: Sequence[tuple[int, int, str]]) -> None:
    """Raise ValueError naming the node and ranks when local ranks on a node are not 0..n-1 once each."""
    by_node: dict[str, list[tuple[int, int]]] = {}
    for rank, local_rank, node in layout:
        by_node.setdefault(node, []).append((local_rank, rank))
    for node, pairs in by_node.items():
        local_ranks = sorted(local for local, _ in pairs)
        if local_ranks != list(range(len(pairs))):
            ranks = ", ".join(f"rank {r} local_rank {lr}" for lr, r in sorted(pairs, key=lambda p: p[1]))
            raise ValueError(f"node {node} runs {len(pairs)} ranks whose local ranks are not 0..{len(pairs) - 1} "
                             f"once each ({ranks}); check the launcher's LOCAL_RANK / SLURM_LOCALID")


def format_layout(layout: Sequence[tuple[int, int, str]]) -> str:
    """``node1: ranks 0,1 (local 0,1); node2: ranks 2,3 (local 0,1)`` (nodes in order of their first rank)."""
    by_node: dict[str, list[tuple[int, int]]] = {}
    for rank, local_rank, node in layout:
        by_node.setdefault(node, []).append((rank, local_rank))
    return "; ".join(f"{node}: ranks {','.join(str(r) for r, _ in pairs)} (local {','.join(str(lr) for _, lr in pairs)})"
                     for node, pairs in by_node.items())


def init_process_group(env: DistEnv, backend: str | None = None, timeout_s: float = 1800.0,
                       force: bool = False) -> None:
    """Join the default process group described by ``env`` (``init_method="env://"``).

    Backend: NCCL when CUDA is available, else gloo; ``backend`` overrides. Writes ``env``'s
    rendezvous and ranks into ``os.environ`` so DeepSpeed, which reads ``RANK`` / ``LOCAL_RANK`` /
    ``MASTER_ADDR`` from there, sees the same job under every launcher. Binds the CUDA device to
    ``local_rank`` when CUDA is available. A one-process job creates no group unless ``force``.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local_rank={env.local_rank} but only {torch.cuda.device_count()} "
                             "CUDA devices are visible; launch one process per GPU")
        torch.cuda.set_device(env.local_rank)
    if env.world_size == 1 and not force:
        return
    if dist.is_initialized():
        if dist.get_rank() != env.rank or dist.get_world_size() != env.world_size:
            raise ValueError(f"a process group is already initialized as rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, not rank {env.rank} of {env.world_size}")
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which is not available; use backend='gloo'")
    os.environ.update({
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
    })
    kwargs = {}
    if backend == "nccl":
        # Binding the device at init lets NCCL connect eagerly and tells barrier() which GPU to use.
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    log.info("init_process_group: backend=%s rank=%d/%d local_rank=%d/%d master=%s:%d launcher=%s",
             backend, env.rank, env.world_size, env.local_rank, env.local_world_size,
             env.master_addr, env.master_port, env.launcher)
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s), **kwargs)


def destroy_process_group() -> None:
    """Leave the default process group, if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process(env: DistEnv) -> bool:
    """Rank 0: the one process that writes checkpoints, logs and samples."""
    return env.rank == 0


def is_local_main_process(env: DistEnv) -> bool:
    """Local rank 0: the one process per node for node-local work (cache downloads, unpacking)."""
    return env.local_rank == 0


# ----------------------------------------------------------------------------- collectives
# The training loop and the EMA call these; each is the identity without a process group.


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if _active() else 0


def all_gather_flat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation over the ranks of ``group`` of each rank's 1-D ``tensor`` (same size on all)."""
    if not _active():
        return tensor.flatten()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat([p.flatten() for p in parts])


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a float tensor (a copy)."""
    out = values.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (small, trusted objects between our own ranks only)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (default: all), in place on the tensor's device (no copy to the
    host); returns ``values``."""
    if _active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def all_reduce_sum(values: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum over ranks of a tensor (a copy on the CPU); ``device`` is where the backend reduces it."""
    out = values.detach().clone()
    if _active():
        out = out.to(device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (small, trusted objects between our own ranks only)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
