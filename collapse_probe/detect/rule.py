"""The one definition of a collapse, shared by `watch`, `analyze`, `report`, `demo` and `recover`.

A run has **collapsed** when its success (or mean reward) has dropped, i.e. stayed below `drop_frac` x its running
peak for `drop_persistence` steps (the peak is tracked from step 0, so a drop in the first steps counts), and
the drop is structural: a control-token spike or a format-breakage alert was raised (before or after the drop),
or at least `broken_frac` of the sampled turns are broken (full collapse or text pollution) at the drop. A run
whose turns stay broken for `breakage_persist` consecutive steps has collapsed even before its reward falls.
A reward drop with healthy formats is reported as a reward drop, not as a collapse.

One checkpoint on its own (recover) has no history: it is collapsed when its greedy success is below
`drop_frac` x a reference success (a healthy checkpoint's, or 1.0 when none is known) and the turns are broken.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CollapseRule:
    drop_frac: float = 0.5        # success below this fraction of its running peak ...
    drop_persistence: int = 2     # ... for this many consecutive steps is a reward drop
    drop_smooth: int = 3          # the peak is taken over the median of the last few values (outliers)
    min_peak: float = 0.1         # a peak below this is too small to drop from
    min_drop: float = 0.1         # and the fall must be at least this in absolute terms
    broken_frac: float = 0.5      # broken-turn fraction that makes a reward drop structural on its own
    breakage_persist: int = 10    # steps of a persistent format-breakage alert that are a collapse by themselves

    def __post_init__(self) -> None:
        if not 0 < self.drop_frac < 1:
            raise ValueError(f"drop_frac must be in (0, 1), got {self.drop_frac}")
        if self.drop_persistence < 1 or self.drop_smooth < 1 or self.breakage_persist < 1:
            raise ValueError("drop_persistence, drop_smooth and breakage_persist must be >= 1")
        if not 0 < self.broken_frac <= 1:
            raise ValueError(f"broken_frac must be in (0, 1], got {self.broken_frac}")

    def success_dropped(self, success: float, reference: float = 1.0) -> bool:
        """One value against a reference: below drop_frac x reference by at least min_drop."""
        return (reference >= self.min_peak and success < self.drop_frac * reference
                and reference - success >= self.min_drop)

    def checkpoint_collapsed(self, success: float, broken: float | None, reference: float = 1.0) -> bool:
        """A single checkpoint: success dropped against `reference` and (when known) its turns are broken."""
        return self.success_dropped(success, reference) and (broken is None or broken >= self.broken_frac)


DEFAULT_RULE = CollapseRule()
