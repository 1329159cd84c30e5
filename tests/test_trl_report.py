"""Our keys reach the Trainer's own reporters: TensorBoard event files read back with tensorboard's reader."""

import pytest
import torch
from trl import GRPOConfig

from collapse_probe import CollapseProbeCallback
from collapse_probe.train import tiny
from tests.test_trl_capture import RecordingGRPO, base_model, grpo_args, prompts, reward

pytest.importorskip("tensorboard")


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cp_scalars_in_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = base_model(tmp_path / "base")
    args: GRPOConfig = grpo_args(tmp_path / "out", 2, report_to="tensorboard")
    trainer = RecordingGRPO(model=str(path), reward_funcs=reward, args=args, train_dataset=prompts(),
                            processing_class=tiny.build_tokenizer(), callbacks=[CollapseProbeCallback(every=1)])
    trainer.refs = {}
    trainer.train()
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    scalars: dict[str, list] = {}
    for f in events:
        acc = EventAccumulator(str(f.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    ours = {t for t in scalars if "cp/rollout/" in t or "cp/probe/" in t or "/gp/" in t or t.startswith("gp/")}
    key = next(t for t in scalars if t.endswith("cp/rollout/after_open/end_of_turn"))
    assert sorted(e.step for e in scalars[key]) == [1, 2]  # every step, next to the trainer's own
    assert any(t.endswith("cp/probe/after_open/end_of_turn") for t in ours)
    assert any(t.endswith("reward") for t in scalars) and len(ours) > 20
    # the same dir read back without our files: TensorBoard scalars fill what trainer_state.json lacks
    from collapse_probe.integrations.hf_output import read_hf_output

    import shutil
    shutil.rmtree(tmp_path / "out" / "collapse_probe")
    recs = {r["step"]: r for r in read_hf_output(tmp_path / "out")}
    assert 0 <= recs[1]["cp/rollout/after_open/end_of_turn"] <= 1 and "reward/mean" in recs[1]
