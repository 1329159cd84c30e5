"""The embedded tiny model: a locally built tokenizer with Qwen2.5's control tokens and a small Qwen2 model.

Both are saved and loaded with `save_pretrained`/`from_pretrained` (safetensors), so every code path that
works on them works on a hub model. Nothing is downloaded.

The tokenizer is a small byte-level BPE trained with Qwen2's own pre-tokenizer, so any text encodes and JSON
punctuation splits as in Qwen's vocabulary (`{"` is one token): the paper's measurement "p(`{"`) right after
`<tool_call>\\n`" has the same meaning here.
"""

from __future__ import annotations

import json

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from collapse_probe.train.config import SIZES
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


