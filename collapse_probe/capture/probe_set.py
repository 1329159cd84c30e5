"""A fixed probe set: teacher-forced canonical tool-use contexts scored at decision positions.

On-policy numbers (the model's own rollouts) move first, but they depend on what the policy happened to
sample. A fixed set of gold contexts gives series that compare across runs and checkpoints. Build it from
the embedded tool world, or from your own chat conversations (OpenAI-style messages, rendered with the
tokenizer's chat template; assistant spans found by rendering prefixes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from collapse_probe.capture.stats import RecordMeans, decision_positions, position_stats
from collapse_probe import world
from collapse_probe.errors import UserError
from collapse_probe.schema import Source
from collapse_probe.tokens import ControlTokens, resolve_control_tokens


LOGITS_BUDGET = 1 << 26  # floats of logits one scoring batch may hold (256 MB)


@dataclass
class ProbeSet:
    seqs: list[list[int]]
    gen_masks: list[list[int]]  # 1 on assistant tokens: the positions the model would produce
    roles: ControlTokens
    pad_id: int

    @classmethod
    def from_world(cls, tokenizer: Any, n: int = 16, roles: ControlTokens | None = None) -> "ProbeSet":

        seqs, masks = [], []
        for task in world.task_split("probe", n):
            ids, mask = world.encode_trajectory(tokenizer, task)
            seqs.append(ids)
            masks.append(mask)
        return cls(seqs, masks, roles or resolve_control_tokens(tokenizer), _pad(tokenizer))

    @classmethod
    def from_messages(cls, tokenizer: Any, conversations: list[list[dict]], *, tools: list[dict] | None = None,
                      roles: ControlTokens | None = None) -> "ProbeSet":
        """Each conversation is a list of {"role", "content"[, "tool_calls"]} messages."""
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template: build the probe set from token ids instead, "
                            "or set tokenizer.chat_template")
        seqs, masks = [], []
        for conv in conversations:
            ids: list[int] = []
            mask: list[int] = []
            for i, msg in enumerate(conv):
                if msg.get("role") != "assistant":
                    continue
                head = _render(tokenizer, conv[:i], tools, add_generation_prompt=True)
                full = _render(tokenizer, conv[: i + 1], tools, add_generation_prompt=False)
                if full[: len(head)] != head:
                    raise UserError("the chat template does not render conversations prefix-consistently; "
                                    "pass token ids to ProbeSet(...) directly")
                if len(head) > len(ids):
                    mask += [0] * (len(head) - len(ids))
                mask += [1] * (len(full) - len(head))
                ids = full
            if ids:
                seqs.append(ids)
                masks.append(mask[: len(ids)])
        if not seqs:
            raise UserError("the probe conversations hold no assistant message: add at least one assistant turn")
        return cls(seqs, masks, roles or resolve_control_tokens(tokenizer), _pad(tokenizer))

    @torch.no_grad()
    def score(self, model: torch.nn.Module, *, batch_size: int = 16, source: str = Source.PROBE.value,
              temperature: float = 1.0) -> dict[str, float]:
        """One no-grad forward per batch; returns `cp/probe/{position}/{role}` means over the whole set, at the
        policy's sampling `temperature` (so gold-context and on-policy numbers are the same distribution).
        Batches shrink so one batch's logits stay within `LOGITS_BUDGET` floats (a 49k vocabulary)."""
        was_training = model.training
        model.eval()
        means = RecordMeans()  # each batch's means weighted by its position count
        role_ids = self.roles.distinct_ids()
        device = next(model.parameters()).device
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        width_all = max((len(s) for s in self.seqs), default=1)
        if vocab:
            batch_size = max(1, min(batch_size, LOGITS_BUDGET // (width_all * vocab)))
        for i in range(0, len(self.seqs), batch_size):
            seqs, masks = self.seqs[i:i + batch_size], self.gen_masks[i:i + batch_size]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            gen = torch.zeros_like(ids)
            attn = torch.zeros_like(ids)
            for j, (s, m) in enumerate(zip(seqs, masks)):
                ids[j, :len(s)], gen[j, :len(m)], attn[j, :len(s)] = torch.tensor(s), torch.tensor(m), 1
            ids, gen, attn = ids.to(device), gen.to(device), attn.to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits
            if temperature != 1.0:
                logits = logits / temperature
            pos = decision_positions(ids, gen, role_ids)
            means.add(position_stats(logits, ids, pos, role_ids, is_logp=False, source=source), source)
        model.train(was_training)
        return means.pop()


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                        add_generation_prompt=add_generation_prompt, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)
