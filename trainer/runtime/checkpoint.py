"""Sharded checkpoints that count only once complete, on local disk or any fsspec URL.

Layout of a checkpoint root (``checkpoint.dir``)::

    step00001000/                     one tag per saved step
        zero_pp_rank_*_model_states.pt / *_optim_states.pt   DeepSpeed's sharded engine state
        ema.safetensors               whole fp32 EMA weights (world-size independent)
        rng_rank00000.safetensors     each rank's RNG states
        trainer_state.json            step, samples seen, data position, W&B run id, config...
    latest                            the tag of the newest *complete* checkpoint

``latest`` is written last, atomically (temporary name + rename locally; a single PUT on object
stores), after every rank has finished writing, so a job killed while saving leaves the previous
checkpoint as the one to resume from. Remote roots are written through a local staging directory
and uploaded before the pointer moves.

DeepSpeed's own files are pickles; they are read only through torch's weights-only unpickler
(``trainer.runtime.pickles``: checked before loading, the load itself forced weights-only).
Everything this module writes itself is JSON or safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.checks import check_int, invalid
from trainer.runtime import distributed
from trainer.runtime.pickles import guarded_env
from trainer.images import atomic_write_bytes

log = logging.getLogger(__name__)

POINTER = "latest"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
TAG_RE = re.compile(r"step(\d{8})")
UNIVERSAL_SUFFIX = "_universal"
# A first-stage checkpoint (task=autoencoder) also holds the autoencoder's fp32 weights with its
# latent scale, in one safetensors file a diffusion job loads by path.
AUTOENCODER_FILE = "autoencoder.safetensors"
AUTOENCODER_FORMAT = "ldm-platform/autoencoder"  # its safetensors metadata "format"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


@dataclass
class CheckpointConfig:
    # Local path or any fsspec URL (s3://bucket/run/checkpoints); default: <run_dir>/checkpoints.
    dir: Optional[str] = None
    interval_steps: int = 1000
    keep_last: int = 3
    # auto: continue from the newest complete checkpoint in ``dir`` if there is one;
    # never: refuse to start over an existing checkpoint; or an explicit checkpoint directory/tag.
    resume: str = "auto"
    # Resuming with a changed model / diffusion config is refused unless this is set.
    allow_config_change: bool = False
    # Scratch space for converting a checkpoint to DeepSpeed's universal format and for staging
    # uploads to a remote ``dir``; default: <run_dir>/.checkpoint_work.
    work_dir: Optional[str] = None

    def __post_init__(self) -> None:
        check_int("checkpoint.interval_steps", self.interval_steps, 1)
        check_int("checkpoint.keep_last", self.keep_last, 1)
        if not self.resume:
            raise invalid("checkpoint.resume", self.resume, "'auto', 'never' or a checkpoint path")




class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, file size limit...)."""


def write_failure_reason(directory: Path, error: BaseException) -> str:
    """The OS reason of a failed write. torch.save reports a full disk as ``unexpected pos`` from its C++
    writer without errno, so a small probe write in ``directory`` asks the file system itself."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno})"
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe_error:
        return f"{probe_error.strerror} (errno {probe_error.errno}; {type(error).__name__}: {str(error)[:200]})"
    finally:
        probe.unlink(missing_ok=True)
    return f"{type(error).__name__}: {str(error)[:500]}"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: Optional[dict[str, str]] = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {"python": json.dumps(_jsonable(random.getstate())),
            "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]])}
    return tensors, meta


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_jsonable(o) for o in obj]
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(o) for o in obj)
    return obj


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    random.setstate(_tuplify(json.loads(meta["python"])))
    name, keys, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------- the store


@dataclass
class ResumePoint:
    tag: str
    local_dir: Path  # DeepSpeed reads from here (the root itself, or a downloaded copy)
    state: dict[str, Any]


class CheckpointStore:
    """One checkpoint root; every rank builds one (only rank 0 writes the pointer)."""

    def __init__(self, root: str, work_dir: str | os.PathLike, *, rank: int, local_rank: int = 0) -> None:
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.work_dir = Path(work_dir)
        self.rank, self.local_rank = rank, local_rank

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def latest_tag(self) -> Optional[str]:
        pointer = self._path(POINTER)
        if not self.fs.exists(pointer):
            return None
        tag = self.fs.cat_file(pointer).decode().strip()
        if not TAG_RE.fullmatch(tag):
            raise ValueError(f"{self.url}/{POINTER} names {tag!r}; expected a tag like step00001000")
        if not self.fs.exists(self._path(tag, STATE_FILE)):
            raise FileNotFoundError(f"{self.url}/{POINTER} points at {tag}, which has no {STATE_FILE}; "
                                    f"the checkpoint root was modified by hand")
        return tag

    def tags(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if TAG_RE.fullmatch(n))

    def read_state(self, tag: str) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self._path(tag, STATE_FILE)).decode())

    # ------------------------------------------------------------------ save

    def save_dir(self, tag: str) -> Path:
        """Where DeepSpeed and this module write ``tag``: the root itself, or a staging copy."""
        if self.is_local:
            return Path(self.root) / tag
        return self.work_dir / "staging" / tag

    def save(self, engine, ema_state: Optional[dict[str, torch.Tensor]], state: dict[str, Any], *,
             extra_engines: Optional[dict[str, Any]] = None,
             extra_files: Optional[dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]] = None) -> str:
        """Collective: every rank calls it with the same ``state``; returns the tag.

        ``extra_engines``: more DeepSpeed engines of the job (the autoencoder's discriminator), each
        saved in ``<tag>/<name>/``. ``extra_files``: ``{file name: (tensors, metadata)}`` written by
        rank 0 as safetensors in ``<tag>/``.
        """
        tag = tag_for(int(state["step"]))
        out = self.save_dir(tag)
        if self.rank == 0 and out.exists():
            # Left by a save that was killed before its pointer moved: never pointed to, safe to drop.
            shutil.rmtree(out)
        distributed.barrier()
        try:
            engine.save_checkpoint(str(out.parent), tag=tag, client_state={}, save_latest=False)
            for name, extra in (extra_engines or {}).items():
                extra.save_checkpoint(str(out), tag=name, client_state={}, save_latest=False)
            tensors, meta = rng_state()
            atomic_save_safetensors(tensors, out / f"rng_rank{self.rank:05d}.safetensors", meta)
            if self.rank == 0:
                if ema_state is not None:
                    atomic_save_safetensors(ema_state, out / EMA_FILE)
                for name, (file_tensors, file_meta) in (extra_files or {}).items():
                    atomic_save_safetensors(file_tensors, out / name, file_meta)
                atomic_write_bytes(out / STATE_FILE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
        except (OSError, RuntimeError) as e:
            # Never pointed to: the previous checkpoint and `latest` stay as they were.
            shutil.rmtree(out, ignore_errors=True)
            raise CheckpointWriteError(f"writing checkpoint {tag} (step {state['step']}) to {out} failed: "
                                       f"{write_failure_reason(out.parent, e)}; the partial {tag} was removed and "
                                       f"{self.url}/{POINTER} still names the previous checkpoint") from e
        distributed.barrier()
        if self.rank == 0:
            self._commit(tag, out)
        distributed.barrier()
        return tag

    def _commit(self, tag: str, out: Path) -> None:
        if not self.is_local:
            target = self._path(tag)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
            self.fs.put(str(out), target, recursive=True)
            shutil.rmtree(out)
            self.fs.pipe_file(self._path(POINTER), (tag + "\n").encode())
        else:
            atomic_write_bytes(Path(self.root) / POINTER, (tag + "\n").encode())
        log.info("checkpoint %s complete in %s", tag, self.url)

    def prune(self, keep_last: int) -> list[str]:
        """Remove all but the newest ``keep_last`` complete tags (never the pointer's); rank 0 only."""
        if self.rank != 0:
            return []
        latest = self.latest_tag()
        tags = self.tags()
        keep = set(tags[-keep_last:]) | ({latest} if latest else set())
        removed = []
        for tag in tags:
            if tag not in keep and (latest is None or tag < latest):
                self.fs.rm(self._path(tag), recursive=True)
                removed.append(tag)
        for stale in self.work_dir.glob(f"*{UNIVERSAL_SUFFIX}"):
            if stale.name[: -len(UNIVERSAL_SUFFIX)] not in keep:
                shutil.rmtree(stale, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ load

    def resolve(self, tag: str) -> ResumePoint:
        """Make ``tag`` readable from local disk on this node and return it (collective)."""
        state = self.read_state(tag)
        if self.is_local:
            return ResumePoint(tag=tag, local_dir=Path(self.root), state=state)
        local_root = self.work_dir / "download"
        if self.local_rank == 0 and not (local_root / tag / STATE_FILE).exists():
            tmp = local_root / f".{tag}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            self.fs.get(self._path(tag), str(tmp), recursive=True)
            os.replace(tmp, local_root / tag)
        distributed.barrier()
        return ResumePoint(tag=tag, local_dir=local_root, state=state)


def find_resume_point(store: CheckpointStore, resume: str, work_dir: str | os.PathLike, *, rank: int,
                      local_rank: int = 0) -> Optional[ResumePoint]:
    """What ``checkpoint.resume`` names in ``store``: ``auto`` its newest complete checkpoint (None in an
    empty root), ``never`` nothing (an error if the root holds one), else an explicit ``<root>/<tag>``."""
    if resume == "never":
        if store.latest_tag() is not None:
            raise ValueError(f"checkpoint.resume='never' but {store.url} holds checkpoint {store.latest_tag()}; "
                             f"choose another run_dir or checkpoint.resume=auto")
        return None
    if resume == "auto":
        tag = store.latest_tag()
        return None if tag is None else store.resolve(tag)
    root, _, tag = resume.rstrip("/").rpartition("/")
    return CheckpointStore(root, work_dir, rank=rank, local_rank=local_rank).resolve(tag)


def needs_universal(state: dict[str, Any], world_size: int) -> bool:
    """Whether DeepSpeed can load the engine state directly: ZeRO partitions (and BF16_Optimizer's
    fp32 masters) are cut per rank, so another world size needs the universal format."""
    if int(state["world_size"]) == world_size:
        return False
    return int(state["zero_stage"]) >= 1 or state["precision"] != "fp32"


def convert_to_universal(point: ResumePoint, work_dir: Path, *, rank: int, world_size: int) -> tuple[Path, str]:
    """Convert ``point`` with DeepSpeed's ``ds_to_universal`` (rank 0; the others wait).

    ``--inject_missing_state`` adds the parameter-shape and partition metadata that ZeRO 1/2
    checkpoints of a non-Megatron model lack. Returns ``(load_dir, tag)`` for ``load_checkpoint``.
    """
    tag = point.tag + UNIVERSAL_SUFFIX
    out = work_dir / tag
    if rank == 0 and not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        # trainer.runtime.pickles runs ds_to_universal with every torch.load weights-only.
        cmd = [sys.executable, "-m", "trainer.runtime.pickles",
               "--input_folder", str(point.local_dir / point.tag), "--output_folder", str(out),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        log.info("checkpoint %s was written by %s ranks, this job has %s: converting it to DeepSpeed's "
                 "universal format in %s", point.tag, point.state["world_size"],
                 world_size, out)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=guarded_env())
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {point.local_dir / point.tag} "
                               f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (out / ".complete").touch()
    distributed.barrier()
    return work_dir, tag


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a damaged one (truncated, not safetensors, a tensor
    that cannot be read) raises ``ValueError`` naming the file and, where one is at fault, the key."""
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"it is damaged or truncated") from None
    with f:
        tensors = {}
        for key in f.keys():
            try:
                tensors[key] = f.get_tensor(key)
            except Exception as e:  # noqa: BLE001 - re-raised naming the file and key
                raise ValueError(f"{path}: tensor {key!r} cannot be read ({type(e).__name__}: {e})") from None
        return tensors, f.metadata() or {}


def load_rng(point_dir: Path, rank: int) -> None:
    path = point_dir / f"rng_rank{rank:05d}.safetensors"
    if not path.exists():
        log.warning("no RNG state for rank %d in %s (resumed on more ranks than saved); seeding fresh",
                    rank, point_dir)
        return
    set_rng_state(*read_safetensors(path))


def load_ema(point_dir: Path) -> Optional[dict[str, torch.Tensor]]:
    path = point_dir / EMA_FILE
    return read_safetensors(path)[0] if path.exists() else None


# ----------------------------------------------------------------------------- autoencoder.safetensors


def autoencoder_file_metadata(*, step: int, scale_factor: float, shift_factor: float,
                              config: dict[str, Any]) -> dict[str, str]:
    """The metadata of ``autoencoder.safetensors``: what ``read_autoencoder_metadata`` checks."""
    return {"format": AUTOENCODER_FORMAT, "step": str(step), "scale_factor": repr(scale_factor),
            "shift_factor": repr(shift_factor), "config": json.dumps(config, sort_keys=True)}


def resolve_autoencoder_file(checkpoint: str) -> str:
    """``checkpoint`` (the file, a tag, a checkpoint root or a run dir; local or URL) -> the URL of
    its ``autoencoder.safetensors``."""
    url = checkpoint.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        return url
    if fs.exists(f"{path}/{AUTOENCODER_FILE}"):
        return f"{url}/{AUTOENCODER_FILE}"
    for root in (url, f"{url}/checkpoints"):
        root_path = fsspec.core.url_to_fs(root)[1]
        if not fs.exists(f"{root_path}/{POINTER}"):
            continue
        tag = fs.cat_file(f"{root_path}/{POINTER}").decode().strip()
        if not TAG_RE.fullmatch(tag):
            raise ValueError(f"checkpoint={checkpoint!r}: {root}/{POINTER} names {tag!r}; expected a tag like "
                             f"step00001000")
        if not fs.exists(f"{root_path}/{tag}/{AUTOENCODER_FILE}"):
            raise FileNotFoundError(f"checkpoint={checkpoint!r}: the latest tag {root}/{tag} has no "
                                    f"{AUTOENCODER_FILE}; only task=autoencoder runs write it")
        return f"{root}/{tag}/{AUTOENCODER_FILE}"
    raise FileNotFoundError(
        f"checkpoint={checkpoint!r} is not a checkpoint of an autoencoder: expected an {AUTOENCODER_FILE} file, "
        f"a checkpoint tag holding one, a checkpoint root holding a '{POINTER}' pointer, or a run directory "
        f"holding checkpoints/{POINTER}")


def read_autoencoder_metadata(url: str) -> dict[str, str]:
    """The safetensors metadata of ``url``, reading only the file's header."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"checkpoint {url!r} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"checkpoint {url!r} is not a safetensors file ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != AUTOENCODER_FORMAT:
        raise ValueError(f"checkpoint {url!r} has metadata format={(meta or {}).get('format')!r}; expected "
                         f"{AUTOENCODER_FORMAT!r} (the autoencoder.safetensors of a task=autoencoder checkpoint)")
    missing = [k for k in ("step", "scale_factor", "shift_factor", "config") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint {url!r}: its metadata lacks {missing}")
    return meta
