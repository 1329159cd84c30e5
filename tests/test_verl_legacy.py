"""verl <= 0.7 (the paper's era): the real `DataParallelPPOActor.update_policy`, remove-padding and padded
paths, on the tiny model, CPU, in a fresh process that imports that verl (one verl per environment: the 0.9.x in the
venv serves every other test). Set COLLAPSE_PROBE_VERL_LEGACY to a directory made with
`pip install --no-deps --target DIR verl==0.7.1`; the test is skipped otherwise.

CPU stand-ins: verl's `get_device_id` (CUDA only) returns "cpu", flash_attn's `unpad_input` / `pad_input` (the
remove-padding path; no CPU wheels) are written in torch, and CPU autocast (bf16 only) is set to fp32 like the
reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from collapse_probe.train import tiny
from helpers.verl_setup import REPO, free_port

LEGACY = r"""
import json, os, sys, torch
import torch.distributed as dist
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
dist.init_process_group("gloo", rank=0, world_size=1)
import collapse_probe.integrations.verl  # noqa: F401 - importing it patches verl's classes
from collapse_probe.integrations.verl_capture import ATTR, attach
import helpers.verl_setup as T
import verl
from verl import DataProto
from verl.utils import attention_utils
from verl.workers.actor import dp_actor
from verl.workers.config import FSDPActorConfig
from collapse_probe.models import load as model_load
from collapse_probe.train import tiny

def unpad_input(hidden, mask, unused=None):  # flash_attn.bert_padding's, in torch (CPU has no flash_attn)
    lens = mask.sum(-1, dtype=torch.int32)
    idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    return hidden.reshape(-1, *hidden.shape[2:])[idx], idx, cu, int(lens.max()), lens
def pad_input(hidden_states, indices, batch, seqlen):
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:]); out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])
def rearrange(x, pattern):  # the one pattern dp_actor uses: "b s ... -> (b s) ..."
    return x.reshape(-1, *x.shape[2:])
attention_utils._get_attention_functions = lambda: (lambda t, i: t[i], pad_input, rearrange, unpad_input)
dp_actor.get_device_id = lambda: "cpu"  # verl has no CPU platform
path, tok = {path!r}, tiny.build_tokenizer()
rows = T.samples(tok)
P, R, B = max(len(p) for p, _, _ in rows), max(len(r) for _, r, _ in rows), len(rows)
ids = torch.zeros(B, P + R, dtype=torch.long); am = torch.zeros_like(ids); rm = torch.zeros(B, R, dtype=torch.long)
for i, (p, r, m) in enumerate(rows):
    ids[i, P - len(p):P], ids[i, P:P + len(r)] = torch.tensor(p), torch.tensor(r)
    am[i, P - len(p):P + len(r)] = 1; rm[i, :len(r)] = torch.tensor(m)
out = {{"version": verl.__version__}}
for rmpad in (True, False):
    model = model_load.load_pretrained(path)[0]
    want = T.reference(model.eval(), tok, rows); model.train()
    cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=2,
                          use_remove_padding=rmpad, use_torch_compile=False)
    actor = dp_actor.DataParallelPPOActor(cfg, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    actor.param_dtype = torch.float32  # CPU autocast takes bf16 only: run the forward in fp32 as the reference
    attach(actor, tok)
    data = DataProto.from_dict(tensors={{"input_ids": ids, "attention_mask": am, "responses": ids[:, P:],
        "position_ids": (am.cumsum(1) - 1).clamp(min=0), "response_mask": rm, "old_log_probs": torch.zeros(B, R),
        "advantages": torch.randn(B, R, generator=torch.Generator().manual_seed(0))}},
        meta_info={{"temperature": T.TEMPERATURE}})
    metrics = actor.update_policy(data)
    got = {{k[len("actor/"):]: v for k, v in metrics.items() if k.startswith("actor/cp/")}}
    out[str(rmpad)] = {{"same_keys": set(got) == set(want), "worst": max(abs(got[k] - want[k]) for k in want),
                        "forwards": getattr(actor, ATTR).forwards}}
print(json.dumps(out))
"""


@pytest.fixture
def tiny_model(tmp_path):
    tok = tiny.build_tokenizer()
    tiny.build_model(tok, "tiny").save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", tok


@pytest.mark.skipif(not os.environ.get("COLLAPSE_PROBE_VERL_LEGACY"),
                    reason="set COLLAPSE_PROBE_VERL_LEGACY to a `pip install --no-deps --target DIR verl==0.7.1`")
def test_legacy_actor_stats_equal_the_reference(tiny_model, tmp_path):
    path, _ = tiny_model
    script = tmp_path / "legacy.py"
    script.write_text(LEGACY.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.environ["COLLAPSE_PROBE_VERL_LEGACY"], str(REPO)])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["version"].startswith("0.")
    for layout in ("True", "False"):
        assert res[layout]["same_keys"] and res[layout]["forwards"] == 2, res
        assert res[layout]["worst"] < 1e-4, res
    print(f"verl {res['version']} legacy actor: max abs diff {max(res[k]['worst'] for k in ('True', 'False')):.2e}")
