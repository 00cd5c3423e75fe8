"""Shared fixtures: tiny local models (no network), small text corpora, a loopback S3 server."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

import pytest

import system_packages

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the Hub fails instead of hanging


def pytest_unconfigure(config):
    """Tests skipped for a missing system package: how many, which packages, the command that brings
    them; here rather than in pytest_terminal_summary so that it is the session's last line."""
    system_packages.report(config.pluginmanager.get_plugin("terminalreporter"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) as a safetensors folder (converted
    once by `make setup`)."""
    from pipeline.models import embedded_model_dir
    return embedded_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A randomly initialised 4-layer Llama with SmolLM2's tokenizer, saved as a local folder so
    that the real loading code path (from_pretrained on a path) is what the tests exercise."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama loaded as the stages load models (CPU)."""
    from pipeline.models import ModelConfig, load_model
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A few kilobytes of varied text in .txt and .jsonl files."""
    import json
    d = tmp_path_factory.mktemp("text")
    words = ("the quick brown fox jumps over lazy dogs while seven wizards quietly hex "
             "a jovial king who packs my box with five dozen liquor jugs").split()
    for i in range(6):
        lines = [" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(12)) + "." for j in range(40)]
        (d / f"doc{i}.txt").write_text("\n".join(lines))
    with open(d / "docs.jsonl", "w") as f:
        for j in range(30):
            f.write(json.dumps({"text": f"Document {j}: " + " ".join(words[j % 5:j % 5 + 15])}) + "\n")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on loopback, as s3fs's own tests use.
    Yields storage options for s3fs; each test makes its own bucket."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    import s3fs
    fs = s3fs.S3FileSystem(**s3_server)
    # a valid bucket name (<= 63 of [a-z0-9-]), distinct for parametrized tests whose names share a prefix
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:45].strip("-")
    name = f"b-{slug}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    return name, s3_server
