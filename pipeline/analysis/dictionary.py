"""An exported SAE checked against the language model it will be spliced into: the one adapter the
analysis stages (evaluate, interpret, steer, audit) share.

    d = Dictionary.load("runs/demo/train/topk/sae", loaded)   # checks hook and width against the model
    f = d.encode(x)          # [rows, n_features] dense latent activations (every architecture)
    r, i, v = d.encode_sparse(x)   # the same, as (row, feature, value) of the non-zero latents
    x_hat = d.decode(f)      # f @ W_dec + b_dec

The exported weights take raw activations (the training scale is folded in, docs in
pipeline/sae/checkpoint.py), so nothing here normalises.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pipeline.analysis import release  # release.load reads an export or a release folder
from pipeline.analysis.config import InputConfig
from pipeline.errors import ConfigError, HookNotFoundError
from pipeline.models import LoadedModel, hook_choices, load_model, resolve_hook
from pipeline.sae import SparseAutoencoder, SparseCode
from pipeline.sae.checkpoint import CONFIG_FILE


class Dictionary:
    """An SAE plus the hook it reads. `hook` is the name to pass to replace_output/ActivationCapture
    (as the checkpoint or the config names it), `module` the module path it resolves to."""

    def __init__(self, sae: SparseAutoencoder, hook: str, module: str, path: str = "<memory>"):
        self.sae, self.hook, self.module, self.path = sae.eval().requires_grad_(False), hook, module, path

    @classmethod
    def load(cls, path: str | Path, loaded: LoadedModel, hook: str | None = None) -> "Dictionary":
        """The SAE at `path` (an export or a release folder), checked against `loaded`: the hook must be
        a module of the model and its output as wide as the SAE's input (checked again on the first
        activations)."""
        sae = release.load(path, device=loaded.device)
        meta = getattr(sae, "meta", {})
        return cls.attach(sae, loaded, hook or meta.get("hook"), str(path), meta.get("model"),
                          hook_from_checkpoint=not hook)

    @classmethod
    def from_input(cls, inp: InputConfig) -> tuple[LoadedModel, "Dictionary"]:
        """The model an analysis stage's input names, and its dictionary attached to it."""
        loaded = load_model(inp.model)
        return loaded, cls.load(inp.checkpoint, loaded, inp.hook)

    @classmethod
    def attach(cls, sae: SparseAutoencoder, loaded: LoadedModel, hook: str | None, path: str = "<memory>",
               trained_on: dict | str | None = None, hook_from_checkpoint: bool = False) -> "Dictionary":
        """`hook_from_checkpoint`: the hook is the one cfg.json records (the store's hook the SAE was
        trained on), not one the user set: the error says so, since the user never typed it."""
        if not hook:
            raise ConfigError(f"the SAE at {path!r} names no hook in its cfg.json. Fix: set hook=<module path>, "
                              "e.g. hook=model.layers.15, to the layer it was trained on")
        try:
            module = resolve_hook(loaded.model, hook)
        except HookNotFoundError:
            origin = (f"recorded in its {CONFIG_FILE}: the hook of the activation store it was trained on"
                      if hook_from_checkpoint else "set by hook=")
            raise HookNotFoundError(
                f"the SAE at {path!r} reads hook {hook!r} ({origin}), but the model {loaded.model_id!r} "
                f"({type(loaded.model).__name__}) has no module of that name. {hook_choices(loaded.model, hook)} "
                "Fix: use the model the SAE was trained on (model.name=...), or set hook=<module path> to this "
                "model's name for that layer") from None
        width = _hook_width(loaded, module)
        d_sae = sae.cfg.d_model
        if width is not None and width != d_sae:
            raise ConfigError(f"the SAE at {path!r} has d_model={d_sae}, but hook {hook!r} of the model "
                              f"{loaded.model_id!r} outputs width {width}. Fix: use the model and hook the SAE "
                              "was trained on (model.name=..., hook=...)")
        trained_id = trained_on.get("id") if isinstance(trained_on, dict) else trained_on
        if trained_id and trained_id != loaded.model_id:
            print(f"warning: the SAE at {path!r} was trained on activations of {trained_id!r}; splicing it into "
                  f"{loaded.model_id!r}", flush=True)
        return cls(sae.to(loaded.device), hook, module, path)

    @property
    def n_features(self) -> int:
        return self.sae.cfg.n_features

    @property
    def d_model(self) -> int:
        return self.sae.cfg.d_model

    def check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise ConfigError(f"hook {self.hook!r} gives activations of width {x.shape[-1]}, but the SAE at "
                              f"{self.path!r} has d_model={self.d_model}. Fix: use the model and hook the SAE "
                              "was trained on")

    def check_feature(self, index: int, what: str = "feature") -> int:
        if not 0 <= index < self.n_features:
            raise ConfigError(f"{what} {index} is out of range: the SAE at {self.path!r} has {self.n_features} "
                              f"features (valid indices 0..{self.n_features - 1})")
        return index

    def decoder(self) -> Tensor:
        """[n_features, d_model] decoder rows as used: feature i adds f_i * decoder()[i]."""
        return self.sae.decoder_weight().detach()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """[..., n_features] dense latent activations of activations x [..., d_model]."""
        shape = x.shape[:-1]
        return self._code(x).dense(len(self.sae.features)).reshape(*shape, -1)  # padding adds 0

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The non-zero latents of activations x [rows, d_model] as (rows, features, values), without
        building the dense [rows, n_features] code."""
        code = self._code(x)
        keep = code.values > 0  # zeros are padding; every architecture's latents are >= 0
        rows = torch.arange(code.values.shape[0], device=x.device)[:, None].expand_as(code.indices)
        return rows[keep], code.indices[keep] + self.sae.features.start, code.values[keep]

    def _code(self, x: Tensor) -> SparseCode:
        self.check_width(x)
        return self.sae.encode(x.reshape(-1, x.shape[-1]).to(self.sae.W_enc.dtype))

    @torch.no_grad()
    def decode(self, f: Tensor) -> Tensor:
        return f @ self.decoder() + self.sae.b_dec

    @torch.no_grad()
    def forward(self, x: Tensor):
        """The architecture's own forward (ForwardOutput: x_hat, l0, fired per feature, ...)."""
        self.check_width(x)
        return self.sae(x.reshape(-1, x.shape[-1]).to(self.sae.W_enc.dtype))


def _hook_width(loaded: LoadedModel, module: str) -> int | None:
    """The hook's output width where it is known without running the model: the hidden size for
    the residual stream (the blocks themselves); None for other modules (checked on first use)."""
    from pipeline.models import block_list, text_config
    try:
        blocks, layers = block_list(loaded.model)
    except HookNotFoundError:
        return None
    if module.startswith(blocks + ".") and module[len(blocks) + 1:].isdigit():
        return text_config(loaded.model.config).hidden_size  # a VLM's config keeps it in text_config
    return None
