"""The mismatch at the decision positions inside a real TRL GRPOTrainer: vLLM cannot run on CPU, so the test
supplies what TRL's vLLM path puts in the batch (`sampling_per_token_logps`, here from a perturbed copy of the
policy: a sampler that is not the trainer) and checks the callback's `mm/` keys against a reference from the
trainer's materialised logits; without them the record says why."""
import math

import torch

from collapse_probe import CollapseProbeCallback
from collapse_probe.capture.mismatch import k3, watch_roles
from collapse_probe.capture.stats import decision_positions
from collapse_probe.models import load as model_load
from collapse_probe.runs.joined import read_records
from collapse_probe.schema import ANY_TOKEN, MM_STATUS, mm_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import tiny
from helpers.trl_setup import TEMPERATURE, RecordingGRPO, base_model, grpo_args, prompts, reward


class SamplerGRPO(RecordingGRPO):
    """GRPOTrainer whose batches carry the sampler's log-probs (as with vLLM generation); the reference of the
    mismatch keys is computed on each training batch."""

    sampler: torch.nn.Module
    mm_refs: dict

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            logits = self.sampler(input_ids=ids, attention_mask=attn).logits.float() / TEMPERATURE
        lq = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out["sampling_per_token_logps"] = lq[:, out["prompt_ids"].shape[1] - 1:]
        return out

    def compute_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():
            self.mm_refs[self.state.global_step + 1] = mismatch_reference(model, inputs, self.processing_class)
        return super().compute_loss(model, inputs, *args, **kwargs)


@torch.no_grad()
def mismatch_reference(model, inputs, tok) -> dict:
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    own = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float() / TEMPERATURE, -1)
    p0 = inputs["prompt_ids"].shape[1]
    role_ids = resolve_control_tokens(tok).distinct_ids()
    roles, cols = watch_roles(role_ids)
    out = {}
    for kind, (r, c) in decision_positions(ids, own, role_ids).items():
        tok_next = ids[r, c + 1]
        lp = logp[r, c].gather(-1, tok_next[:, None]).squeeze(-1)
        lq = inputs["sampling_per_token_logps"][r, c + 1 - p0]
        for role, col in [(ANY_TOKEN, None)] + list(zip(roles, cols)):
            sel = torch.ones_like(lp, dtype=torch.bool) if col is None else tok_next == col
            out[mm_key(kind, role, "count")] = float(sel.sum())
            if sel.any():
                out[mm_key(kind, role, "p_train")] = float(lp[sel].exp().mean())
                out[mm_key(kind, role, "p_rollout")] = float(lq[sel].exp().mean())
                out[mm_key(kind, role, "log_ratio")] = float((lp - lq)[sel].mean())
                out[mm_key(kind, role, "k3")] = float(k3(lp - lq)[sel].mean())
    return out


def test_trl_mismatch_keys_equal_the_reference(tmp_path):
    path = base_model(tmp_path / "base")
    tok = tiny.build_tokenizer()
    sampler, _ = model_load.load_pretrained(path)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trainer = SamplerGRPO(model=str(path), reward_funcs=reward, args=grpo_args(tmp_path / "out", 2),
                          train_dataset=prompts(), processing_class=tok, callbacks=[CollapseProbeCallback(every=100)])
    trainer.refs, trainer.mm_refs, trainer.sampler = {}, {}, sampler.eval()
    trainer.train()
    recs = {r["step"]: r for r in read_records(tmp_path / "out")}
    worst = 0.0
    for step, ref in trainer.mm_refs.items():
        assert ref[mm_key("after_open", ANY_TOKEN, "count")] >= 4
        for k, v in ref.items():
            assert k in recs[step], k
            worst = max(worst, abs(recs[step][k] - v))
        assert MM_STATUS not in recs[step]
    assert len(trainer.mm_refs) == 2 and worst < 1e-4, worst
    assert abs(recs[1][mm_key("after_open", ANY_TOKEN, "log_ratio")]) > 1e-3  # the sampler is not the trainer


def test_trl_without_sampler_logprobs_says_so(tmp_path):
    path = base_model(tmp_path / "base")
    trainer = RecordingGRPO(model=str(path), reward_funcs=reward, args=grpo_args(tmp_path / "out", 1),
                            train_dataset=prompts(), processing_class=tiny.build_tokenizer(),
                            callbacks=[CollapseProbeCallback(every=100)])
    trainer.refs = {}
    trainer.train()
    rec = {r["step"]: r for r in read_records(tmp_path / "out")}[1]
    assert "sampling_per_token_logps" in rec[MM_STATUS] and not any(k.startswith("mm/") and k != MM_STATUS
                                                                    for k in rec)
    assert math.isfinite(rec["cp/rollout/after_open/count"])
