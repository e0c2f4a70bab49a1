"""Reading DeepSpeed's checkpoint files without running code from them.

DeepSpeed writes its engine state (``*_model_states.pt``, ``*_optim_states.pt``) with ``torch.save`` and
reads it back with ``torch.load(weights_only=False)`` - in ``load_checkpoint``, ``zero_to_fp32`` and
``ds_to_universal`` - so a checkpoint folder from a shared bucket could run any code on load. Here
every such load goes through torch's weights-only unpickler:

- ``check_pickles`` reads the pickle opcodes of every ``.pt`` file of a checkpoint (without running
  them) and refuses, naming the file, one that needs a global outside torch's safe set and
  ``ALLOWED_GLOBALS``;
- ``weights_only_loads`` forces ``weights_only=True`` on every ``torch.load`` inside it
  (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which overrides DeepSpeed's explicit ``weights_only=False``),
  with ``ALLOWED_GLOBALS`` allowed;
- ``python -m trainer.runtime.pickles <ds_to_universal arguments>`` runs DeepSpeed's universal
  conversion under the same mode (its worker processes are forked and inherit it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Iterator

import torch

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# What torch's weights-only unpickler raises on a refused global (the standard library's class).
REFUSED = torch.serialization.pickle.UnpicklingError
# The only non-tensor, non-container types DeepSpeed 0.19's checkpoints hold, found with
# torch.serialization.get_unsafe_globals_in_checkpoint on real ZeRO 0-3 checkpoints, fp32 and bf16
# (the ZeRO stage, the loss scaler of the optimizer wrapper, the bf16 optimizer's fragment map);
# DynamicLossScaler is what fp16 saves in LossScaler's place. Each is rebuilt by the weights-only
# unpickler from plain values (an enum by value, the others by __new__ and their __dict__).
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file needs more than tensors and DeepSpeed's own types to load."""


def _allowed_objects() -> list:
    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def pickle_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself (a file) or every ``*.pt`` file under it (a checkpoint tag, any depth)."""
    path = Path(path)
    return [path] if path.is_file() else sorted(path.rglob("*.pt"))


def check_pickles(path: str | os.PathLike) -> int:
    """Refuse ``path`` (a ``.pt`` file or a folder of them) if any file would need a global beyond
    torch's weights-only set and ``ALLOWED_GLOBALS``; nothing is unpickled. Returns the files checked."""
    files = pickle_files(path)
    for f in files:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # noqa: BLE001 - not torch's zip format: refused below, with its reason
            raise UnsafeCheckpointError(f"{f} is not a torch.save zip archive ({type(e).__name__}: {e}); "
                                        f"refusing to load it") from None
        bad = sorted(set(found) - set(ALLOWED_GLOBALS))
        if bad:
            raise UnsafeCheckpointError(
                f"{f} holds pickled objects that are neither tensors nor DeepSpeed's checkpoint types: {bad}; "
                f"refusing to load it (a checkpoint is only loaded with torch's weights-only unpickler)")
    return len(files)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included) is weights-only, ``ALLOWED_GLOBALS`` allowed;
    a refused file raises ``UnsafeCheckpointError``."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            yield
    except REFUSED as e:
        raise UnsafeCheckpointError(f"a checkpoint file was refused by the weights-only unpickler: "
                                    f"{str(e).splitlines()[0]}") from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


def guarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process that loads checkpoints: weights-only forced."""
    env = dict(os.environ if environ is None else environ)
    env[FORCE_ENV] = "1"
    return env


def main() -> None:
    """DeepSpeed's ``ds_to_universal`` with the arguments of this process, every load weights-only."""
    # Imported here: deepspeed takes seconds to import and only the conversion needs it.
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.parse_arguments()
    check_pickles(args.input_folder)
    with weights_only_loads():
        ds_to_universal.main(args)


if __name__ == "__main__":
    main()
