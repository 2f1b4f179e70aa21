"""Figures with units and provenance: greenstack never reports a bare number.

`measured` = read from a hardware counter or timed on this run; `estimated` = derived from a model
(TDP x utilisation, replayed grid trace, annual average); `fallback` = no source was available and a
configured default was used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Provenance = Literal["measured", "estimated", "fallback"]
PROVENANCES: tuple[str, ...] = ("measured", "estimated", "fallback")

_RANK = {"measured": 0, "estimated": 1, "fallback": 2}


@dataclass(frozen=True)
class Figure:
    """A reported value with its unit, provenance label and source description."""

    value: float | int | str | None
    unit: str
    provenance: Provenance
    source: str

    def __post_init__(self) -> None:
        if self.provenance not in _RANK:
            raise ValueError(f"provenance must be one of {PROVENANCES}, got {self.provenance!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def weakest(*provenances: str) -> Provenance:
    """The least trustworthy of several labels: a product is only as measured as its weakest input."""
    return max(provenances, key=lambda p: _RANK[p])  # type: ignore[return-value]
