"""What every command does around its work: turn a user's mistake (a misspelt key, a value the
override grammar or a config check refuses, a missing file, an existing output) into one message on
stderr and exit code 2, without a traceback; suggest the nearest existing key for a misspelt one
(instead of Hydra's advice to add it with ``+``).

``HYDRA_FULL_ERROR=1`` keeps the traceback, as for Hydra itself.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

# What a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OmegaConfBaseException,
               ConfigCompositionException, OverrideParseException)
USAGE_EXIT_CODE = 2
# Absolute: a command also runs when its module is imported (a launcher, a test), not only as
# ``python -m``, where Hydra would otherwise look for a Python package ``conf``.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CLI_CONF_DIR = str(Path(CONF_DIR) / "cli")


def nearest_keys(key: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The existing keys closest in spelling to ``key`` (difflib's ratio >= 0.6, best first)."""
    return difflib.get_close_matches(key, [c for c in candidates if c != "hydra"], n=n, cutoff=0.6)


def unknown_key_message(error: BaseException, prefix: str = "") -> Optional[str]:
    """For OmegaConf's "key not in this config" error (``train.max_step``): the message naming the
    key and the nearest existing keys of the same node; None for any other error. ``prefix`` is
    where the config sits in what the user types (``eval.`` for eval.run's ``eval.*`` keys)."""
    if not isinstance(error, (ConfigKeyError, ConfigAttributeError)) or error.parent_node is None:
        return None
    full_key = prefix + str(error.full_key or error.key)
    parent, _, key = full_key.rpartition(".")
    try:
        keys = [str(k) for k in error.parent_node.keys()]
    except Exception:  # noqa: BLE001 - a node that cannot list its keys: no suggestion, the plain message
        return None
    near = [f"{parent}.{k}" if parent else k for k in nearest_keys(key, keys)]
    where = f"the keys of {parent}" if parent else "the top-level keys and groups"
    msg = f"{full_key} is not a key of this config"
    if near:
        msg += f"; did you mean {' or '.join(near)}?"
    listed = ", ".join(k for k in keys if k != "hydra")
    return f"{msg}\n  {where}: {listed}"


def _parse_hint(text: str) -> str:
    if any(c in text for c in "{}[],"):
        return ("\n  Hydra's override grammar reads { } [ ] , itself: quote a value holding them inside the "
                "shell's quotes, e.g. 'data.urls=\"s3://bucket/laion/{00000..12345}.tar\"' or "
                "'data.urls=[\"s3://a/{0..9}.tar\",b.tar]'")
    return ""


def describe_user_error(error: BaseException) -> str:
    """One message for a user's mistake: the nearest key for a misspelt one, Hydra's and OmegaConf's
    own words otherwise (without their advice to append a key with ``+``)."""
    if isinstance(error, OverrideParseException):
        return f"{error}{_parse_hint(str(error))}"
    cause = error.__cause__
    suggestion = unknown_key_message(error) or (unknown_key_message(cause) if cause is not None else None)
    if suggestion is not None:
        return suggestion
    text = str(error)
    if isinstance(error, ConfigCompositionException):
        text = "\n".join(line for line in text.splitlines() if not line.startswith("To append to your config"))
        if cause is not None and str(cause) not in text:
            text = f"{text}\n{cause}"
    return text


def _fail(error: BaseException) -> None:
    print(f"error: {describe_user_error(error)}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def hydra_command(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function as a command: a user's mistake exits 2 with one message.

    Hydra prints errors itself and exits 1 (with advice to append a misspelt key with ``+``);
    ``HYDRA_FULL_ERROR`` makes it raise them instead, so they are reported here."""
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except USER_ERRORS as e:
        if full_error == "1":
            raise
        _fail(e)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def user_errors_exit(fn: Callable[[], Any]) -> Any:
    """``fn()`` with a user's mistake turned into its message and exit code 2 (commands without Hydra)."""
    try:
        return fn()
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(e)


def run_cli(fn: Callable[[Any], Any], dict_cfg) -> Any:
    """Entry point of the one-machine tools (sample, export, precompute, eval.reconstruction): logs to
    stderr, validates the config (``OmegaConf.to_object``) and runs ``fn`` on it; a user's mistake
    (bad value, missing file, existing output) exits 2 with its message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return user_errors_exit(lambda: fn(OmegaConf.to_object(dict_cfg)))
