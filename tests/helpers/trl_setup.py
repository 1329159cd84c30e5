"""A real TRL GRPOTrainer around the tiny model, and the materialised-logits reference its captured numbers are
checked against. Shared by test_trl_capture.py, test_trl_report.py and test_trl_distributed.py (whose worker
script imports this with tests/ on sys.path)."""
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from collapse_probe import world
from collapse_probe.capture.stats import decision_positions
from collapse_probe.schema import Part, Source, cp_count_key, cp_entropy_key, cp_key, gp_key
from collapse_probe.tokens import resolve_control_tokens
from collapse_probe.train import tiny

TEMPERATURE = 0.7


def base_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        tok = tiny.build_tokenizer()
        tiny.build_model(tok, "tiny").save_pretrained(path)
        tok.save_pretrained(path)
    return path


def reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def grpo_args(out: Path, steps: int, **kw) -> GRPOConfig:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=12, temperature=TEMPERATURE, learning_rate=1e-3, beta=0.0, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0,
                disable_tqdm=True, seed=0, gradient_checkpointing=False)
    return GRPOConfig(**{**base, **kw})


def prompts(n: int = 16) -> Dataset:
    """Text prompts that end inside an open call: every completion starts at an `after_open` decision row."""
    return Dataset.from_dict({"prompt": [f"{t.question}\n{world.TOOL_OPEN}\n" for t in world.task_split("train", n)]})


class RecordingGRPO(GRPOTrainer):
    """Computes the reference on each training batch, from materialised logits (the model's own forward)."""

    refs: dict
    batches: dict | None = None  # the training batches too, when a test sets a dict

    def compute_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():
            self.refs[self.state.global_step + 1] = reference(model, inputs, self.processing_class)
            if self.batches is not None:
                self.batches[self.state.global_step + 1] = inputs
        return super().compute_loss(model, inputs, *args, **kwargs)


@torch.no_grad()
def reference(model, inputs, tok) -> dict:
    """GRPO: the policy's tokens are completion_mask x tool_mask; gradient pressure from the advantages."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    own = inputs["completion_mask"] * inputs.get("tool_mask", torch.ones_like(inputs["completion_mask"]))
    own = torch.cat([torch.zeros_like(inputs["prompt_mask"]), own], 1)
    return reference_at(model, ids, attn, own, tok, TEMPERATURE, inputs["advantages"].reshape(-1))


@torch.no_grad()
def reference_at(model, ids, attn, own, tok, temperature: float, adv=None) -> dict:
    """Full log-softmax of the logits / temperature at the decision rows, means per position kind."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()  # not fused: the original forward
    logp = torch.log_softmax(logits / temperature, dim=-1)
    role_ids = resolve_control_tokens(tok).distinct_ids()
    src = Source.ROLLOUT.value
    out = {}
    for kind, (r, c) in decision_positions(ids, own, role_ids).items():
        out[cp_count_key(src, kind)] = float(r.numel())
        if not r.numel():
            continue
        lp = logp[r, c]
        out[cp_entropy_key(src, kind)] = float(-(lp.exp() * lp).sum(-1).mean())
        for role, i in role_ids.items():
            p = lp[:, i].exp()
            out[cp_key(src, kind, role)] = float(p.mean())
            if adv is not None:
                chose = (ids[r, c + 1] == i).float()
                out[gp_key(kind, role, Part.CHOSEN)] = float((adv[r] * (1 - p) * chose).mean())
    return out
