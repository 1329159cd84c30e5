"""`collapse_probe.integrations.verl` against the installed verl (0.9.x): its real `TrainingWorker.train_mini_batch`
-> `FSDPEngineWithLMHead` train_batch / forward_backward_batch / prepare_model_inputs / prepare_model_outputs with
verl's `ppo_loss`, on the tiny model, CPU. The statistics it adds to the actor's metrics equal a reference computed
here, independently (one unpadded forward per sample, decision positions found by plain loops), within 1e-4, in the
remove-padding and the padded layouts, over several micro-batches; tool tokens (response mask 0) do not count.

What cannot run on CPU and how it is covered: verl has no CPU platform (its `get_device_id` calls CUDA), so the
tests point verl's device helpers at the CPU; FSDP wrapping needs an accelerator, so the engine holds the plain
module (its non-FSDP branches, which verl has for this); a ulysses forward needs flash-attention's all-to-all
attention, so the sequence-parallel test runs verl's real input preparation, slicing and output gathering on two
gloo processes and gives each rank the slice of the full logits that forward would produce.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="verl is installed by `make setup` (pip install --no-deps verl plus the test "
                                   "extra's verl dependencies)")

import torch.distributed as dist

import collapse_probe.integrations.verl  # noqa: F401 - importing it patches verl's classes
from collapse_probe.integrations.verl_capture import ATTR, attach
from collapse_probe.models import load as model_load
from collapse_probe.train import tiny
from helpers.verl_setup import REPO, batch, cpu_shims, free_port, make_worker, reference, samples


@pytest.fixture(scope="module")
def world():
    """A one-process gloo group (verl's engine calls collectives), verl's device helpers on the CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from verl.workers import engine_workers as ew
    from verl.workers.engine.fsdp import transformer_impl as ti

    with pytest.MonkeyPatch.context() as mp:
        cpu_shims(mp, ti, ew)
        yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


def run_update(worker, td) -> dict[str, float]:
    from verl.utils import tensordict_utils as tu

    metrics = tu.get(worker.train_mini_batch(td), "metrics")
    return {k: v[0] for k, v in metrics.items() if k.startswith("cp/")}


@pytest.mark.parametrize("remove_padding", [True, False], ids=["remove_padding", "padded"])
def test_update_stats_equal_the_reference(world, tiny_model, remove_padding):
    path, tok = tiny_model
    worker = make_worker(path, remove_padding=remove_padding)
    rows = samples(tok)
    want = reference(worker.engine.module.eval(), tok, rows)  # the weights the update's forwards see
    worker.engine.module.train()
    before = [p.detach().clone() for p in worker.engine.module.parameters()]
    got = run_update(worker, batch(tok, rows))
    assert set(got) == set(want) and len(want) > 20
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst < 1e-4, worst
    assert got["cp/rollout/after_open/count"] == 5 and got["cp/rollout/turn_start/count"] == 7
    cap = getattr(worker.engine, ATTR)
    assert cap.forwards == 2  # two micro-batches of two
    # it was the policy update: the optimizer stepped after these forwards
    assert any(not torch.equal(a, b) for a, b in zip(before, worker.engine.module.parameters()))
    print(f"verl 0.9 engine ({'remove padding' if remove_padding else 'padded'}): max abs diff {worst:.2e}")


@pytest.mark.parametrize("remove_padding", [True, False], ids=["remove_padding", "padded"])
def test_mismatch_keys_from_rollout_log_probs_equal_the_reference(world, tiny_model, remove_padding):
    """With `rollout_log_probs` in the batch (calculate_log_probs=true; here from a perturbed copy of the policy, a
    rollout engine that is not the trainer) the actor's metrics carry the mismatch keys of capture/mismatch.py."""
    from verl.utils import tensordict_utils as tu

    from helpers.verl_setup import TEMPERATURE, mismatch_reference

    path, tok = tiny_model
    worker = make_worker(path, remove_padding=remove_padding)
    rows = samples(tok)
    sampler = model_load.load_pretrained(path)[0].eval()
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rollout = []
    for p, r, _ in rows:
        with torch.no_grad():
            lq = (sampler(input_ids=torch.tensor([p + r])).logits[0].double() / TEMPERATURE).log_softmax(-1)
        rollout.append([float(lq[len(p) - 1 + j, tok_]) for j, tok_ in enumerate(r)])
    want = mismatch_reference(worker.engine.module.eval(), tok, rows, rollout)
    worker.engine.module.train()
    metrics = tu.get(worker.train_mini_batch(batch(tok, rows, rollout_logp=rollout)), "metrics")
    got = {k: v[0] for k, v in metrics.items() if k.startswith("mm/")}
    assert len(want) > 20 and want["mm/after_open/any/count"] == 5
    worst = max(abs(got[k] - v) for k, v in want.items())
    assert worst < 1e-4, worst
    assert abs(got["mm/after_open/any/log_ratio"]) > 1e-3  # the rollout engine is not the trainer


def test_tool_tokens_do_not_count(world, tiny_model):
    path, tok = tiny_model
    masked = run_update(make_worker(path, remove_padding=True, lr=0.0), batch(tok, samples(tok)))
    unmasked = run_update(make_worker(path, remove_padding=True, lr=0.0), batch(tok, samples(tok, mask_tools=False)))
    # three trajectories carry the tag inside a tool response: counted only if tool tokens were the policy's
    assert masked["cp/rollout/after_open/count"] == 5
    assert unmasked["cp/rollout/after_open/count"] == 8
    assert masked["cp/rollout/turn_start/count"] == 7 and unmasked["cp/rollout/turn_start/count"] == 4


def test_no_grad_forwards_are_not_measured(world, tiny_model):
    """verl's old-log-prob pass (`infer_batch`, under no_grad) adds nothing: only the update's forwards count."""
    from verl.utils import tensordict_utils as tu

    path, tok = tiny_model
    worker = make_worker(path, remove_padding=True)
    cap = attach(worker.engine, tok)
    cap.active = True
    td = batch(tok, samples(tok))
    tu.assign_non_tensor(td, use_remove_padding=True, use_dynamic_bsz=False, micro_batch_size_per_gpu=2,
                         use_fused_kernels=False)
    out = worker.engine.infer_batch(td)
    assert out["model_output"]["log_probs"] is not None and cap.forwards == 0
    assert cap.finish() == {f"cp/rollout/{k}/count": 0.0 for k in ("after_close", "after_open", "body_closed",
                                                                    "json_body", "turn_start")}


def test_stats_reach_verls_file_logger_and_analyze_reads_them(world, tiny_model, tmp_path, monkeypatch):
    """Driver side as verl does it: rename_dict(..., "actor/") and reduce_metrics, then its FileLogger; our
    reader maps `actor/cp/...` back to `cp/...`."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import (
        rename_dict,  # what ray_trainer._update_actor calls
    )
    from verl.utils.tracking import FileLogger

    from collapse_probe.runs.joined import read_records

    path, tok = tiny_model
    worker = make_worker(path, remove_padding=True)
    metrics = tu.get(worker.train_mini_batch(batch(tok, samples(tok))), "metrics")
    logged = reduce_metrics(rename_dict(dict(metrics), "actor/"))
    assert "actor/cp/rollout/after_open/end_of_turn" in logged
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "proj" / "exp.jsonl"))
    (tmp_path / "proj").mkdir()
    log = FileLogger("proj", "exp")
    log.log(logged, step=1)
    log.finish()
    rec = read_records(tmp_path / "proj")[0]
    assert rec["cp/rollout/after_open/count"] == 5.0
    assert abs(rec["cp/rollout/after_open/end_of_turn"] - logged["actor/cp/rollout/after_open/end_of_turn"]) < 1e-12


def test_loaded_by_verl_external_modules_in_a_fresh_process():
    code = ("import sys, verl\n"
            "assert 'collapse_probe.integrations.verl' in sys.modules\n"
            "from verl.workers.engine.fsdp import transformer_impl as ti\n"
            "from verl.workers import engine_workers as ew\n"
            "print(ti.FSDPEngineWithLMHead.prepare_model_outputs.__collapse_probe__,"
            " ew.TrainingWorker.train_mini_batch.__collapse_probe__)\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "collapse_probe.integrations.verl", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True"]


SP_WORKER = r'''
import json, os, sys, types, torch
import torch.distributed as dist
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
import collapse_probe.integrations.verl  # noqa: F401 - importing it patches verl's classes
from collapse_probe.integrations.verl_capture import ATTR, attach
import helpers.verl_setup as T
from verl.utils import tensordict_utils as tu
from verl.utils.ulysses import set_ulysses_sequence_parallel_group, slice_input_tensor
from verl.workers import engine_workers as ew
from verl.workers.engine.fsdp import transformer_impl as ti
mp = __import__("pytest").MonkeyPatch(); T.cpu_shims(mp, ti, ew)
from collapse_probe.models import load as model_load
from collapse_probe.train import tiny
tok = tiny.build_tokenizer()
out = {{}}
for mode in ("ulysses", "data_parallel"):
    worker = T.make_worker({path!r}, remove_padding=True, lr=0.0)
    engine, model = worker.engine, worker.engine.module.eval()
    rows = T.samples(tok)
    if mode == "data_parallel":  # each rank its own half of the batch
        rows = rows[rank::2]
        set_ulysses_sequence_parallel_group(None)
    else:
        engine.use_ulysses_sp, engine.ulysses_sequence_parallel_size = True, 2
        set_ulysses_sequence_parallel_group(dist.new_group([0, 1]))
    mb = T.batch(tok, rows)
    tu.assign_non_tensor(mb, use_remove_padding=True, temperature=T.TEMPERATURE, sp_size=2 if mode == "ulysses" else 1)
    cap = attach(engine, tok); cap.active = True
    inputs, args = engine.prepare_model_inputs(mb)  # verl's packing, padding and slicing
    ids = mb["input_ids"].values().unsqueeze(0)
    pos = mb["position_ids"].values().unsqueeze(0)
    with torch.no_grad():
        full = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # [1, nnz, V], as verl calls it
    # this rank's part, padded and sliced as ulysses_pad_and_slice_inputs does the ids (verl's own slicer)
    local = slice_input_tensor(full, dim=1, padding=True) if mode == "ulysses" else full
    res = engine.prepare_model_outputs(types.SimpleNamespace(logits=local), args, mb, None)  # gathers log-probs
    stats = cap.finish()
    out[mode] = {{"stats": stats, "local_rows": int(local.shape[1]), "nnz": int(ids.shape[1]),
                 "logp_rows": int(res["log_probs"].values().shape[0])}}
if rank == 0:
    print(json.dumps(out))
'''


def test_ulysses_slices_and_ranks_all_reduce(tiny_model, tmp_path):
    """Two gloo processes. Ulysses: each rank holds half the packed sequence's logits (verl's own
    `slice_input_tensor`, what `ulysses_pad_and_slice_inputs` slices the ids with); data parallel: each rank half the batch. After the all-reduce both give the
    whole batch's statistics."""
    path, tok = tiny_model
    script = tmp_path / "sp_worker.py"
    script.write_text(SP_WORKER.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    res = json.loads(outs[0][0].strip().splitlines()[-1])
    want = reference(model_load.load_pretrained(path)[0].eval(), tok, samples(tok))
    for mode in ("ulysses", "data_parallel"):
        got = res[mode]["stats"]
        assert set(got) == set(want), mode
        worst = max(abs(got[k] - want[k]) for k in want)
        assert worst < 1e-4, (mode, worst, {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > 1e-4})
        print(f"{mode}: max abs diff {worst:.2e}")
    assert res["ulysses"]["local_rows"] * 2 >= res["ulysses"]["nnz"] > res["ulysses"]["local_rows"]

