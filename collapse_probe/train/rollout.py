"""Multi-turn sampling with the environment in the loop: batched, KV-cached, left-padded decoding.

Each sample is one conversation. A turn is decoded for every live conversation at once; the environment reads
each finished turn, answers with a `<tool_response>` user turn (masked from the loss) or ends the episode.
We keep token ids as sampled (never re-tokenise model output), so the training forward sees exactly the
sequence the policy produced.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from collapse_probe import world

POLICY, HINTED, ORACLE = "policy", "hinted", "oracle"  # where a trajectory's turns came from (Trajectory.source)

# (generated ids of the current turn for each live row, logits [rows, vocab]) -> logits
LogitsProcessor = Callable[[list[list[int]], torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    task: world.Task
    episode: world.Episode
    ids: list[int]
    gen_mask: list[int]  # 1 where the policy produced the token
    # log-prob of each generated token under the sampler that drew it (0 elsewhere): the rollout engine's q, after
    # temperature and truncation (top-p/top-k renormalised), which is what it sampled from
    old_logp: list[float]
    reward: float = 0.0
    group: int = 0
    source: str = POLICY  # or HINTED (sampled with a hint, train/hints.py), ORACLE (train/offpolicy.py)
    # with `watch_ids`: per token, the sampler's log-probs of those ids where it predicted that token (else None)
    watch_logq: list[list[float] | None] | None = None

    @property
    def success(self) -> bool:
        return self.episode.success


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


class DecodeSession:
    """A batch of conversations whose KV cache lives across turns.

    Each turn only the new tokens (the previous turn's unfed tail, the observation, the next assistant header)
    are prefilled; the context is never re-encoded. New segments are left-padded *inside* the sequence with
    attention-mask holes, and rows whose episode ended are dropped from the cache.
    """

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.next_pos = torch.zeros(0, dtype=torch.long)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the current batch), in this order."""
        idx = torch.tensor(rows, dtype=torch.long)
        if self.cache is not None:
            self.cache.batch_select_indices(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]

    def feed(self, segments: list[list[int]]) -> torch.Tensor:
        """Append one segment per row (lengths may differ); returns the last logits [rows, vocab]."""
        n, width = len(segments), max(len(s) for s in segments)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        seg_mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(segments):
            if s:
                ids[i, width - len(s):] = torch.tensor(s)
                seg_mask[i, width - len(s):] = 1
        if self.cache is None:
            self.mask, self.next_pos = torch.zeros((n, 0), dtype=torch.long), torch.zeros(n, dtype=torch.long)
        pos = self.next_pos[:, None] + (seg_mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, seg_mask], dim=1)
        logits, self.cache = model_forward(self.model, ids, self.mask, pos, self.cache)
        self.next_pos = self.next_pos + seg_mask.sum(-1)
        return logits[:, -1, :].float()


def truncate_logits(logits: torch.Tensor, *, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) truncation of temperature-scaled logits [rows, vocab], as HF and vLLM apply
    them: tokens outside get -inf, so a log-softmax afterwards is the truncated, renormalised distribution the
    sampler draws from. The nucleus is the fewest most-probable tokens whose mass reaches `top_p` (at least one)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def decode_turn(session: DecodeSession, segments: list[list[int]], *, eos_id: int, max_new_tokens: int,
                temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                logits_processor: LogitsProcessor | None = None, top_p: float = 1.0, top_k: int = 0,
                watch_ids: list[int] | None = None
                ) -> tuple[list[list[int]], list[list[float]], list[list[int]], list[list[list[float]]]]:
    """Feed `segments`, then decode one assistant turn per row until `eos_id` (kept) or `max_new_tokens`.

    Returns (generated ids, their log-probs under the distribution sampled from, unfed tail per row: sampled
    tokens not yet in the cache, per generated token the log-probs of `watch_ids` there (empty lists without))."""
    last = session.feed(segments)
    n = len(segments)
    out: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    watched: list[list[list[float]]] = [[] for _ in range(n)]
    watch = torch.tensor(watch_ids, dtype=torch.long) if watch_ids else None
    live = torch.ones(n, dtype=torch.bool)
    for j in range(max_new_tokens):
        if logits_processor is not None:
            last = logits_processor(out, last)
        scaled = last / max(temperature, 1e-6)
        if not greedy and (top_p < 1.0 or top_k):
            scaled = truncate_logits(scaled, top_p=top_p, top_k=top_k)
        logp = torch.log_softmax(scaled, dim=-1)
        tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        seen = logp.index_select(-1, watch).tolist() if watch is not None else None
        sampled = live.clone()
        for i in torch.nonzero(sampled).flatten().tolist():
            out[i].append(int(tok[i]))
            logps[i].append(float(tok_logp[i]))
            if seen is not None:
                watched[i].append(seen[i])
        live &= tok != eos_id
        if not live.any() or j == max_new_tokens - 1:
            return out, logps, [[int(tok[i])] if sampled[i] else [] for i in range(n)], watched
        # Rows that finished earlier feed a masked pad; rows that sampled now feed their token.
        last = session.feed([[int(tok[i])] if sampled[i] else [] for i in range(n)])
    return out, logps, [[] for _ in range(n)], watched


def rollout(model, tokenizer, tasks: list[world.Task], *, group_size: int = 1, max_turns: int = 8,
            max_new_tokens: int = 48, temperature: float = 1.0, greedy: bool = False,
            reward: world.RewardSpec | None = None, seed: int | None = None, system: str | None = None,
            parse: Callable[[str], tuple[list[dict], str | None]] | None = None,
            logits_processor: LogitsProcessor | None = None, harness: str = world.STRICT,
            hinted: int = 0, hint_system: Callable[[world.Task], str] | None = None, top_p: float = 1.0,
            top_k: int = 0, watch_ids: list[int] | None = None) -> list[Trajectory]:
    """Sample `group_size` conversations per task with the environment in the loop (`harness`: world.episode).
    The first `hinted` samples of each group see `hint_system(task)` as their system prompt (source "hinted").
    `top_p` / `top_k` truncate the sampling distribution (train/engine.py); `watch_ids` keeps the sampler's
    log-probs of those ids at every generated token (`Trajectory.watch_logq`: the control columns' q)."""
    reward = reward or world.RewardSpec()
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(world.IM_END), tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    trajs = []
    for g, task in enumerate(tasks):
        prompt = tokenizer.encode(world.prompt_text(task, system), add_special_tokens=False)
        for j in range(group_size):
            ep = world.Episode(task, max_turns=max_turns, parse=parse or world.parse_calls, harness=harness)
            ids, source = prompt, POLICY
            if j < hinted and hint_system is not None:
                ids, source = tokenizer.encode(world.prompt_text(task, hint_system(task)), add_special_tokens=False), HINTED
            trajs.append(Trajectory(task, ep, list(ids), [0] * len(ids), [0.0] * len(ids), group=g, source=source,
                                    watch_logq=[None] * len(ids) if watch_ids else None))
    live = list(range(len(trajs)))
    session = DecodeSession(model, pad_id)
    pending = [list(trajs[i].ids) for i in live]  # tokens of each live row not yet in the KV cache
    while live:
        gen, logps, unfed, watched = decode_turn(session, pending, eos_id=eos_id, max_new_tokens=max_new_tokens,
                                                 temperature=temperature, greedy=greedy, generator=generator,
                                                 logits_processor=logits_processor, top_p=top_p, top_k=top_k,
                                                 watch_ids=watch_ids)
        still, still_rows, pending = [], [], []
        for row, (i, toks, lps) in enumerate(zip(live, gen, logps)):
            t = trajs[i]
            t.ids += toks
            t.gen_mask += [1] * len(toks)
            t.old_logp += lps
            tail = list(unfed[row])
            if not toks or toks[-1] != eos_id:  # truncated turn: close it (not the policy's token)
                t.ids.append(eos_id)
                t.gen_mask.append(0)
                t.old_logp.append(0.0)
                tail.append(eos_id)
                toks = toks + [eos_id]
            if t.watch_logq is not None:
                t.watch_logq += watched[row] + [None] * (len(t.ids) - len(t.watch_logq) - len(watched[row]))
            text = tokenizer.decode(toks[:-1], skip_special_tokens=False)
            obs = t.episode.step(text)
            if obs is not None:
                seg = tokenizer.encode(world.observation_text(obs), add_special_tokens=False)
                t.ids += seg
                t.gen_mask += [0] * len(seg)
                t.old_logp += [0.0] * len(seg)
                if t.watch_logq is not None:
                    t.watch_logq += [None] * len(seg)
                still.append(i)
                still_rows.append(row)
                pending.append(tail + seg)
        live = still
        if live:
            session.keep(still_rows)
    for t in trajs:
        t.reward = reward(t.episode)
    model.train(was_training)
    return trajs
