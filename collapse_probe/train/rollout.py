"""Multi-turn sampling with the environment in the loop: batched, KV-cached, left-padded decoding.

Each sample is one conversation. A turn is decoded for every live conversation at once; the environment reads
each finished turn, answers with a `<tool_response>` user turn (masked from the loss) or ends the episode.
We keep token ids as sampled (never re-tokenise model output), so the training forward sees exactly the
sequence the policy produced.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from collapse_probe.train import world

# (generated ids of the current turn for each live row, logits [rows, vocab]) -> logits
LogitsProcessor = Callable[[list[list[int]], torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    task: world.Task
    episode: world.Episode
    ids: list[int]
    gen_mask: list[int]  # 1 where the policy produced the token
    old_logp: list[float]  # log-prob of each generated token when it was sampled (0 elsewhere)
    reward: float = 0.0
    group: int = 0

    @property
    def success(self) -> bool:
        return self.episode.success


def prompt_text(task: world.Task, system: str | None = None) -> str:
    system = world.system_prompt() if system is None else system
    return (f"{world.IM_START}system\n{system}{world.IM_END}\n{world.IM_START}user\n{task.question}{world.IM_END}\n"
            f"{world.IM_START}assistant\n")


def observation_text(obs: str) -> str:
    return f"\n{world.IM_START}user\n{obs}{world.IM_END}\n{world.IM_START}assistant\n"


def model_forward(model, input_ids, attention_mask, position_ids, cache=None):
    """Call a HF causal LM with a KV cache, whichever keyword this transformers version uses."""
    key = _cache_kwarg(type(model))
    kwargs = {key: cache} if cache is not None else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs)
    return out.logits, getattr(out, "cache", None) or getattr(out, "past_key_values", None)


_CACHE_KW: dict[type, str] = {}


def _cache_kwarg(cls: type) -> str:
    if cls not in _CACHE_KW:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KW[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[cls]


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.no_grad()
def decode_turn(model, contexts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                logits_processor: LogitsProcessor | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Decode one assistant turn for each context until `eos_id` (kept) or `max_new_tokens`."""
    ids, mask, pos = _left_pad(contexts, pad_id)
    logits, cache = model_forward(model, ids, mask, pos)
    last = logits[:, -1, :].float()
    n = len(contexts)
    out: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    live = torch.ones(n, dtype=torch.bool)
    next_pos = pos[:, -1] + 1
    for _ in range(max_new_tokens):
        if logits_processor is not None:
            last = logits_processor(out, last)
        scaled = last / max(temperature, 1e-6)
        logp = torch.log_softmax(scaled, dim=-1)
        if greedy:
            tok = logp.argmax(-1)
        else:
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        for i in torch.nonzero(live).flatten().tolist():
            out[i].append(int(tok[i]))
            logps[i].append(float(tok_logp[i]))
        live &= tok != eos_id
        if not live.any():
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        logits, cache = model_forward(model, tok[:, None], mask, next_pos[:, None], cache)
        next_pos = next_pos + 1
        last = logits[:, -1, :].float()
    return out, logps


def rollout(model, tokenizer, tasks: list[world.Task], *, group_size: int = 1, max_turns: int = 8,
            max_new_tokens: int = 48, temperature: float = 1.0, greedy: bool = False,
            reward: world.RewardSpec | None = None, seed: int | None = None, system: str | None = None,
            parse: Callable[[str], tuple[list[dict], str | None]] | None = None,
            logits_processor: LogitsProcessor | None = None) -> list[Trajectory]:
    """Sample `group_size` conversations per task with the environment in the loop."""
    reward = reward or world.RewardSpec()
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(world.IM_END), tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    trajs = []
    for g, task in enumerate(tasks):
        prompt = tokenizer.encode(prompt_text(task, system), add_special_tokens=False)
        for _ in range(group_size):
            ep = world.Episode(task, max_turns=max_turns, parse=parse or world.parse_calls)
            trajs.append(Trajectory(task, ep, list(prompt), [0] * len(prompt), [0.0] * len(prompt), group=g))
    live = list(range(len(trajs)))
    while live:
        gen, logps = decode_turn(model, [trajs[i].ids for i in live], eos_id=eos_id, pad_id=pad_id,
                                 max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                                 generator=generator, logits_processor=logits_processor)
        still = []
        for i, toks, lps in zip(live, gen, logps):
            t = trajs[i]
            t.ids += toks
            t.gen_mask += [1] * len(toks)
            t.old_logp += lps
            if not toks or toks[-1] != eos_id:  # truncated turn: close it (not the policy's token)
                t.ids.append(eos_id)
                t.gen_mask.append(0)
                t.old_logp.append(0.0)
                toks = toks + [eos_id]
            text = tokenizer.decode(toks[:-1], skip_special_tokens=False)
            obs = t.episode.step(text)
            if obs is not None:
                seg = tokenizer.encode(observation_text(obs), add_special_tokens=False)
                t.ids += seg
                t.gen_mask += [0] * len(seg)
                t.old_logp += [0.0] * len(seg)
                still.append(i)
        live = still
    for t in trajs:
        t.reward = reward(t.episode)
    model.train(was_training)
    return trajs
