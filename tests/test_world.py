"""Task-seed ranges: train / eval / probe / repair never share a task, for any run seed 0..10,000."""
import pytest

from collapse_probe import world
from collapse_probe.world.tasks import TASKS_PER_RUN_SEED, task_seed

EVAL_N, PROBE_N = 100_000, 100_000  # far more than any command draws


def _span(split: str, run_seed: int = 0, n: int = TASKS_PER_RUN_SEED) -> range:
    lo, hi = task_seed(split, 0, run_seed), task_seed(split, n - 1, run_seed)
    assert hi - lo == n - 1  # each split is one contiguous block of seeds per run seed
    return range(lo, hi + 1)


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def test_train_eval_probe_repair_are_disjoint_for_seeds_0_to_10000():
    fixed = [_span("eval", n=EVAL_N), _span("probe", n=PROBE_N)]
    assert not _overlap(*fixed)
    blocks = list(fixed)
    for run_seed in range(10_001):
        for split in ("train", "repair"):
            block = _span(split, run_seed)
            assert not any(_overlap(block, other) for other in fixed), (split, run_seed)
            blocks.append(block)
    blocks.sort(key=lambda r: r.start)  # no two blocks of any split or run seed overlap
    assert all(a.stop <= b.start for a, b in zip(blocks, blocks[1:]))


def test_seeds_10_and_20_no_longer_train_on_eval_or_probe_tasks():
    held_out = {t.seed for t in world.task_split("eval", 64)} | {t.seed for t in world.task_split("probe", 16)}
    for run_seed in (0, 10, 20):
        train = {t.seed for t in world.task_split("train", 8 * 50, run_seed=run_seed)}
        assert not train & held_out


def test_seeds_0_to_9_keep_the_tuned_layout():
    assert task_seed("train", 5, 3) == 3_000_005 and task_seed("eval", 7) == 10_000_007


def test_out_of_range_is_refused():
    with pytest.raises(ValueError):
        task_seed("bogus", 0)
    with pytest.raises(ValueError):
        task_seed("train", TASKS_PER_RUN_SEED)
