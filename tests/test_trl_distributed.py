"""`accelerate launch --num_processes 2` on CPU (gloo): the record holds the sums over both ranks, equal to the
single-process computation on the same global batch; only rank 0 writes; a rank with no decision rows at a step
still enters every collective (the run ends instead of hanging)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collapse_probe.runs.joined import read_records
from collapse_probe.schema import cp_count_key
from helpers.trl_setup import base_model

REPO = Path(__file__).resolve().parents[1]
WORKER = '''
import sys, torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {repo!r} + "/tests")  # the `helpers` package, importable as under pytest
import collapse_probe.integrations.trl as cap_trl
from collapse_probe import CollapseProbeCallback
from collapse_probe.train import tiny
from helpers.trl_setup import RecordingGRPO, grpo_args, prompts, reward

torch.set_num_threads(1)
out, base = sys.argv[1], sys.argv[2]
trainer = RecordingGRPO(model=base, reward_funcs=reward, args=grpo_args(out, 2, per_device_train_batch_size=4),
                        train_dataset=prompts(), processing_class=tiny.build_tokenizer(),
                        callbacks=[CollapseProbeCallback(every=100)])
trainer.refs = {{}}
rank = trainer.accelerator.process_index
original = cap_trl.batch_of

def batch_of(inputs):  # rank 1 has no decision rows at step 2
    b = original(inputs)
    if rank == 1 and trainer.state.global_step + 1 == 2:
        b.own.zero_()
    return b
cap_trl.batch_of = batch_of
trainer.train()
torch.save(trainer.refs, f"{{out}}/refs_rank{{rank}}.pt")
'''


def combine(refs: list[dict]) -> dict:
    """Count-weighted means over the ranks' batches: the statistics of the global batch."""
    out: dict = {}
    for k in refs[0]:
        if k.endswith("/count"):
            out[k] = sum(r[k] for r in refs)
    for k in {k for r in refs for k in r if not k.endswith("/count")}:
        kind = k.split("/")[-2] if k.startswith("cp/") else k.split("/")[1]
        ck = cp_count_key("rollout", kind)
        w = [(r[ck], r[k]) for r in refs if k in r and r[ck] > 0]
        out[k] = sum(n * v for n, v in w) / sum(n for n, _ in w)
    return out


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate launcher not installed")
def test_two_ranks_sum_like_one_process(tmp_path):
    base = base_model(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    # `--cpu` starts one process in this accelerate; `--multi_gpu` is torchrun, and use_cpu=True makes it gloo
    proc = subprocess.run([launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out), str(base)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["step"]: r for r in read_records(out)}
    refs = [torch.load(out / f"refs_rank{i}.pt") for i in (0, 1)]
    want = combine([refs[0][1], refs[1][1]])
    worst = max(abs(recs[1][k] - v) for k, v in want.items())
    assert worst < 1e-4, worst
    assert recs[1][cp_count_key("rollout", "after_open")] >= 8  # both ranks' 4 completions
    # step 2: rank 1 measured nothing, entered the reduction anyway; the record is rank 0's rows alone
    assert recs[2][cp_count_key("rollout", "after_open")] == refs[0][2][cp_count_key("rollout", "after_open")]
    assert len(list(out.rglob("metrics.jsonl"))) == 1  # only rank 0 writes
    print(f"2 ranks vs the global-batch reference: max abs diff {worst:.2e}")
