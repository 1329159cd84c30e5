"""The embedded tiny model: a locally built tokenizer with Qwen2.5's control tokens and a small Qwen2 model.

Both are saved and loaded with `save_pretrained`/`from_pretrained` (safetensors), so every code path that
works on them works on a hub model. Nothing is downloaded.

The tokenizer is a small byte-level BPE trained with Qwen2's own pre-tokenizer, so any text encodes and JSON
punctuation splits as in Qwen's vocabulary (`{"` is one token): the paper's measurement "p(`{"`) right after
`<tool_call>\\n`" has the same meaning here.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from collapse_probe.errors import UserError
from collapse_probe.train.config import SIZES
from collapse_probe.weights import check_weights
from collapse_probe import world

CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- for tc in message.tool_calls %}{%- set f = tc.function if tc.function else tc %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_corpus(n_tasks: int = 400) -> list[str]:
    """Text the BPE learns its merges from: whole oracle conversations of the tool world."""
    from collapse_probe.world import observation_text, prompt_text

    texts = []
    for task in world.task_split("tokenizer", n_tasks):
        parts = [prompt_text(task)]
        for turn, obs in world.oracle_turns(task):
            parts.append(turn + world.IM_END)
            if obs:
                parts.append(observation_text(obs))
        texts.append("".join(parts))
    # every value word, quoted as the world writes it, often enough to become a single token
    values = world.NAMES + world.CITIES + world.USER_IDS + world.SKIES
    texts += [" ".join(f'"{v}"' for v in values)] * 8
    return texts


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 1024) -> Qwen2Tokenizer:
    """Train a byte-level BPE exactly the way Qwen2's tokenizer splits text (same pre-tokenizer regex, byte
    alphabet, NFC), then wrap it as a `Qwen2Tokenizer`: `AutoTokenizer` reloads it faithfully, and `{"`,
    `\\n`, `}}` split as they do in the real Qwen vocabulary. Deterministic."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[world.ENDOFTEXT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    fast = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, eos_token=world.IM_END,
                          pad_token=world.ENDOFTEXT, additional_special_tokens=[world.IM_START, world.IM_END])
    # As in Qwen2.5, the tool tags are added tokens but not "special": decode(skip_special_tokens=True) keeps them.
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in world.SPECIAL_TOKENS[3:]])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(tokenizer: PreTrainedTokenizerBase, size: str = "small", seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2-architecture causal LM sized for a CPU."""
    hidden, layers, heads = SIZES[size]
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


@contextmanager
def quiet_transformers():
    """transformers' progress bars and load reports off (our own bars say what is happening)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory or the local hub cache (never the network); any failure is one
    UserError line."""
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                 local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, tokenizers' own errors on bad files, ...
        if not Path(path).exists():
            raise UserError(f"{path}: no such directory, and no such model in the local Hugging Face cache "
                            "(nothing is downloaded): pass a local directory holding tokenizer files") from None
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: could not load a tokenizer ({type(exc).__name__}: {first}); pass a local "
                        "directory holding tokenizer files (hub names work only when already cached)") from None


def load_pretrained(path: str | Path, *, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local directory (or a hub name already in the local cache): safetensors only,
    never a pickle, never the network. Every way a load can fail (no or cut weight files, a lying header,
    missing tensors, bad tokenizer files) is one UserError line. `trust_remote_code` stays off unless asked."""
    path = str(path)
    p = Path(path)
    hint = "pass a directory with config.json, model.safetensors and tokenizer files (e.g. a run's checkpoint-N/)"
    if p.exists() and not (p / "config.json").exists():
        raise UserError(f"{path}: no config.json here; pass a directory written by save_pretrained "
                        "(e.g. a run's checkpoint-N/)")
    if p.is_dir():
        check_weights(p)  # missing, cut or lying weight files: refused from their headers
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():  # its load report and bars would break the one-line error
            model, info = AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32,
                local_files_only=True, output_loading_info=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, torch errors on cut files, OSError, ValueError, ...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: could not load a model and tokenizer ({type(exc).__name__}: {first}); the files "
                        f"may be truncated, corrupt or still being written: {hint}") from None
    missing = [k for k in info.get("missing_keys", ()) if k not in getattr(model, "_tied_weights_keys", ()) or ()]
    if missing:
        raise UserError(f"{path}: the weights lack {len(missing)} tensor(s) (first: {missing[0]}); the checkpoint is "
                        f"incomplete: {hint}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
