"""StateMix: counts of assistant turns per format state and per reason code, and their fractions."""
from __future__ import annotations

from typing import Protocol

from collapse_probe.schema import HEALTHY_STATES, STATES, FormatState, reason_key, state_key


class _Verdict(Protocol):  # what `add` needs of a TurnVerdict (kept structural: mix does not import classify)
    state: FormatState
    reason: str


class StateMix:
    """Counts of turns per state and per reason; ``to_dict()`` is the summary shape used by rollout_files."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {s: 0 for s in STATES}
        self.reasons: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, verdict: _Verdict) -> StateMix:
        self.counts[FormatState(verdict.state).value] += 1
        self.reasons[verdict.reason] = self.reasons.get(verdict.reason, 0) + 1
        return self

    def merge(self, other: StateMix) -> StateMix:
        """Add another mix's counts into this one (in place); returns self."""
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        for k, n in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + n
        return self

    def fractions(self) -> dict:
        """{state: fraction, ..., "reasons": {code: fraction}}; states sum to 1 (NaN when there are no turns)."""
        n = self.total
        out: dict = {s: (c / n if n else float("nan")) for s, c in self.counts.items()}
        out["reasons"] = {r: c / n for r, c in self._sorted_reasons()} if n else {}
        return out

    def metrics(self) -> dict[str, float]:
        """Flat record keys of DESIGN.md: fmt/{state} and fmt/reason/{code}."""
        f = self.fractions()
        out = {state_key(s): f[s] for s in STATES}
        out.update({reason_key(r): v for r, v in f["reasons"].items()})
        return out

    def healthy_fraction(self) -> float:
        n = self.total
        return sum(self.counts[s.value] for s in HEALTHY_STATES) / n if n else float("nan")

    def _sorted_reasons(self) -> list[tuple[str, int]]:
        return sorted(((r, c) for r, c in self.reasons.items() if c), key=lambda rc: (-rc[1], rc[0]))

    def to_dict(self) -> dict:
        return {"turns": self.total, **self.counts, "reasons": dict(self._sorted_reasons())}

    @classmethod
    def from_dict(cls, d: dict) -> StateMix:
        mix = cls()
        for s in STATES:
            mix.counts[s] = int(d.get(s, 0))
        mix.reasons = {r: int(c) for r, c in d.get("reasons", {}).items()}
        return mix
