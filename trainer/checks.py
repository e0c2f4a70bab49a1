"""Checks of config values, shared by every component's config dataclass (STYLE.md rule 8: a wrong
value raises ``ValueError`` naming the key, the value and what is allowed, before work starts).

The key is the full dotted name a user types (``data.filters.min_size``), so the message can be
pasted back as the fix.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional


def invalid(key: str, value: Any, allowed: str) -> ValueError:
    """The error for ``key=value`` with what ``allowed`` says would be accepted."""
    return ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")


def is_int(value: Any, minimum: int) -> bool:
    """An int (not a bool) >= ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def is_float(value: Any, minimum: Optional[float] = None) -> bool:
    """A finite number (not a bool), >= ``minimum`` when given."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    return ok and (minimum is None or value >= minimum)


def check_int(key: str, value: Any, minimum: int) -> None:
    if not is_int(value, minimum):
        raise invalid(key, value, f"an int >= {minimum}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise invalid(key, value, f"one of {choices}")
