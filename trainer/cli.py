"""What every one-machine command (sample, export, precompute, eval.reconstruction) does around its
work: log to stderr, validate the config, and turn a user's mistake into a message and exit code 2."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from omegaconf import OmegaConf


def run_cli(fn: Callable[[Any], Any], dict_cfg) -> Any:
    """Entry point of the one-machine tools (sample, export, precompute): logs to stderr, validates
    the config, and turns a user's mistake (bad value, missing file, existing output) into exit code 2
    with its message instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return fn(OmegaConf.to_object(dict_cfg))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
