"""A two-way key map between two state-dict layouts.

Every converter in this package is a ``KeyMap``: a list of (ours, theirs, transform) rows built
from a model config. The same rows convert in both directions, so an import followed by an export
is the identity, and a key that one side has and the map does not know is reported, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# Transforms applied on the way from ours to theirs; each has an exact inverse.
IDENTITY = "identity"
CONV1X1_TO_LINEAR = "conv1x1_to_linear"  # (O, I, 1, 1) -> (O, I): CompVis conv attention vs diffusers Linear
CONV1D_TO_LINEAR = "conv1d_to_linear"  # (O, I, 1) -> (O, I): CompVis AttentionBlock vs diffusers Linear
TRANSFORMS = (IDENTITY, CONV1X1_TO_LINEAR, CONV1D_TO_LINEAR)


def _to_theirs(tensor: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == CONV1X1_TO_LINEAR and tensor.ndim == 4:
        return tensor[:, :, 0, 0]
    if transform == CONV1D_TO_LINEAR and tensor.ndim == 3:
        return tensor[:, :, 0]
    return tensor


def _to_ours(tensor: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == CONV1X1_TO_LINEAR and tensor.ndim == 2:
        return tensor[:, :, None, None]
    if transform == CONV1D_TO_LINEAR and tensor.ndim == 2:
        return tensor[:, :, None]
    return tensor


@dataclass
class ConversionReport:
    """What a conversion could not place: keys of the source the map does not know (unexpected)
    and keys the map expects but the source lacks (missing). ``dropped`` lists keys of their layout
    that the map declares as having no counterpart in ours (``KeyMap.add_theirs_only``) and that an
    import therefore left out on purpose; they do not make a conversion incomplete."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def raise_if_incomplete(self, what: str) -> None:
        if self.ok:
            return
        lines = [f"{what}: the state dict does not match the expected layout."]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing[:10])}"
                         + (" ..." if len(self.missing) > 10 else ""))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected[:10])}"
                         + (" ..." if len(self.unexpected) > 10 else ""))
        raise ValueError("\n".join(lines))


class KeyMap:
    """Rows of (our key, their key, transform). Build with ``add``/``add_module``."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        # (their key, our key it is made from, how) for keys only their layout has.
        self.theirs_only: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = []

    def add(self, ours: str, theirs: str, transform: str = IDENTITY) -> None:
        assert transform in TRANSFORMS, transform
        self.rows.append((ours, theirs, transform))

    def add_module(self, ours: str, theirs: str, params: tuple[str, ...] = ("weight", "bias"),
                   transform: str = IDENTITY) -> None:
        """Map the parameters ``params`` of a submodule (prefixes without a trailing dot)."""
        for p in params:
            self.add(f"{ours}.{p}", f"{theirs}.{p}", transform)

    def add_theirs_only(self, theirs: str, made_from: str,
                        make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Declare a key that only their layout has (e.g. an unused head their class always builds).
        Export writes it as ``make(state_dict[made_from])`` so their module loads strictly; import
        leaves it out and lists it in ``ConversionReport.dropped`` instead of ``unexpected``."""
        self.theirs_only.append((theirs, made_from, make))

    def extend(self, other: "KeyMap", ours_prefix: str = "", theirs_prefix: str = "") -> None:
        for o, t, tr in other.rows:
            self.add(ours_prefix + o, theirs_prefix + t, tr)
        for t, o, make in other.theirs_only:
            self.add_theirs_only(theirs_prefix + t, ours_prefix + o, make)

    def _convert(self, state_dict: dict[str, torch.Tensor], to_theirs: bool
                 ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
        src_idx, dst_idx = (0, 1) if to_theirs else (1, 0)
        out: dict[str, torch.Tensor] = {}
        report = ConversionReport()
        known = set()
        for row in self.rows:
            src, dst, transform = row[src_idx], row[dst_idx], row[2]
            known.add(src)
            if src not in state_dict:
                report.missing.append(src)
                continue
            fn = _to_theirs if to_theirs else _to_ours
            out[dst] = fn(state_dict[src], transform)
        if to_theirs:
            for theirs, made_from, make in self.theirs_only:
                if made_from in state_dict:  # otherwise ``made_from`` is already reported missing
                    out[theirs] = make(state_dict[made_from])
        else:
            theirs_only = {theirs for theirs, _, _ in self.theirs_only}
            report.dropped = sorted(k for k in state_dict if k in theirs_only)
            known |= theirs_only
        report.unexpected = sorted(k for k in state_dict if k not in known)
        return out, report

    def to_theirs(self, state_dict: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
        return self._convert(state_dict, to_theirs=True)

    def to_ours(self, state_dict: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
        return self._convert(state_dict, to_theirs=False)
