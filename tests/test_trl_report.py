"""Our keys reach the Trainer's own reporters: TensorBoard event files read back with tensorboard's reader."""

import pytest
from trl import GRPOConfig

from collapse_probe import CollapseProbeCallback
from collapse_probe.train import tiny
from helpers.trl_setup import RecordingGRPO, base_model, grpo_args, prompts, reward

pytest.importorskip("tensorboard")


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
    from collapse_probe.runs.hf_output import read_hf_output

    import shutil
    shutil.rmtree(tmp_path / "out" / "collapse_probe")
    recs = {r["step"]: r for r in read_hf_output(tmp_path / "out")}
    assert 0 <= recs[1]["cp/rollout/after_open/end_of_turn"] <= 1 and "reward/mean" in recs[1]


def test_cp_scalars_in_trackio_local_db(tmp_path, monkeypatch):
    """report_to="trackio": trackio (local-first) writes the Trainer's logs, ours among them, to a local SQLite
    file under TRACKIO_DIR; nothing is uploaded (no Space id)."""
    import sys

    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_REGISTRY_BUCKET_ID"):
        monkeypatch.delenv(var, raising=False)
    for mod in [m for name, m in sys.modules.items() if name == "trackio" or name.startswith("trackio.")]:
        if hasattr(mod, "TRACKIO_DIR"):  # read once at import: point every copy at the test's dir
            monkeypatch.setattr(mod, "TRACKIO_DIR", store)
    path = base_model(tmp_path / "base")
    args: GRPOConfig = grpo_args(tmp_path / "out", 2, report_to="trackio", project="cp-test", run_name="r1")
    trainer = RecordingGRPO(model=str(path), reward_funcs=reward, args=args, train_dataset=prompts(),
                            processing_class=tiny.build_tokenizer(), callbacks=[CollapseProbeCallback(every=1)])
    trainer.refs = {}
    trainer.train()
    from trackio.sqlite_storage import SQLiteStorage

    assert list(store.glob("*.db")), f"no trackio DB under {store}"
    rows = SQLiteStorage.get_logs("cp-test", "r1")  # trackio's own reader of its project DB
    logs = [r for r in rows if "train/cp/rollout/after_open/end_of_turn" in r]
    assert [r["train/global_step"] for r in logs] == [1, 2]  # every step, in the rows with TRL's own
    for r in logs:  # the Trainer's rewrite_logs puts "train/" in front
        assert 0 <= r["train/cp/rollout/after_open/end_of_turn"] <= 1 and "train/reward" in r
        assert r["train/cp/probe/after_open/count"] > 0
    ours = {k for k in logs[0] if k.startswith(("train/cp/rollout/", "train/cp/probe/", "train/gp/"))}
    assert len(ours) > 20
