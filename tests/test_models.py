"""Hook resolution across architectures, and truncated capture equal to a full forward pass."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig)

from pipeline.errors import HookNotFoundError
from pipeline.models import ActivationCapture, LoadedModel, block_list, resolve_hook

CONFIGS = {
    "llama": (LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2), "model.layers"),
    "gpt2": (GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64), "transformer.h"),
    "gpt_neox": (GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4), "gpt_neox.layers"),
    "gemma": (GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8), "model.layers"),
}


def build(arch):
    torch.manual_seed(0)
    cfg, blocks = CONFIGS[arch]
    return AutoModelForCausalLM.from_config(cfg).eval(), blocks


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_resolver_and_truncated_capture_match_full_forward(arch):
    model, blocks = build(arch)
    assert block_list(model)[0] == blocks
    assert resolve_hook(model, "layers.1") == f"{blocks}.1"
    assert resolve_hook(model, f"{blocks}.2") == f"{blocks}.2"
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the residual stream after block i (the last one is after the final norm)
    ran = []
    last = dict(model.named_modules())[f"{blocks}.2"]
    last.register_forward_hook(lambda *a: ran.append(True))
    cap = ActivationCapture(LoadedModel(model, None, arch, None), [f"{blocks}.0", "layers.1"])
    out = cap(ids)
    torch.testing.assert_close(out[f"{blocks}.0"], hidden[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["layers.1"], hidden[2], rtol=0, atol=1e-6)
    assert not ran, "block 2 ran although the deepest hook was block 1"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unknown_hook_lists_valid_names(arch):
    model, blocks = build(arch)
    with pytest.raises(HookNotFoundError) as e:
        resolve_hook(model, f"{blocks}.7")
    msg = str(e.value)
    assert f"{blocks}.7" in msg and f"{blocks}.0" in msg and f"{blocks}.2" in msg and "did you mean" in msg


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_replace_output_identity_is_exact_and_zeroing_changes_logits(arch):
    from pipeline.models import replace_output
    model, blocks = build(arch)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        clean = model(ids).logits
        with replace_output(model, "layers.1", lambda x: x):
            same = model(ids).logits
        with replace_output(model, "layers.1", torch.zeros_like):
            zeroed = model(ids).logits
        after = model(ids).logits
    assert torch.equal(clean, same) and torch.equal(clean, after)
    assert not torch.allclose(clean, zeroed)
