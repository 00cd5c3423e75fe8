"""The exported SAE checkpoint: framework-free, consolidated, loadable on one process.

    <dir>/cfg.json                              what the weights are (see docs/sae-format.md)
    <dir>/sae_weights.safetensors               the whole dictionary, or, one file per feature shard:
    <dir>/sae_weights-00001-of-00004.safetensors  ... features [start, stop) of each, listed in cfg.json

Weights are for raw (unnormalised) activations: the training input scale is folded in, so
`load(dir)(x)` takes activations as the model produces them and gives the same latents as training.
The reader and the writer live here; file and key names are the constants below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.sae.base import SAEConfig, SparseAutoencoder, create, sae_class

FORMAT_NAME = "pipeline.sae"
FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NOT_EXPORTED = ("tokens_since_fired", "threshold_steps")  # training state only


class CheckpointFormatError(ConfigError):
    """A folder named as an exported SAE holds a cfg.json of another format or version, or weights
    that do not match it."""


def weights_file(shard: int, n_shards: int) -> str:
    return WEIGHTS_FILE if n_shards == 1 else f"sae_weights-{shard + 1:05d}-of-{n_shards:05d}.safetensors"


@torch.no_grad()
def folded_state(sae: SparseAutoencoder, input_scale: float) -> dict[str, torch.Tensor]:
    """This module's tensors for raw inputs x, when it was trained on input_scale * x: the
    pre-activations are unchanged, the reconstruction is divided by the scale."""
    s = float(input_scale)
    out = {name: t.detach().float().cpu().clone() for name, t in sae.state_dict().items() if name not in NOT_EXPORTED}
    out["W_enc"] = out["W_enc"] * s
    out["W_dec"] = sae.decoder_weight().detach().float().cpu() / s
    out["b_dec"] = out["b_dec"] / s
    return out


def save_shard(sae: SparseAutoencoder, path: str | Path, input_scale: float, shard: int, n_shards: int) -> None:
    """Write one feature shard's weights (shard 0 also writes the replicated tensors)."""
    state = folded_state(sae, input_scale)
    keep = {k: v.contiguous() for k, v in state.items() if k in sae.feature_tensors or shard == 0}
    Path(path).mkdir(parents=True, exist_ok=True)
    save_file(keep, str(Path(path) / weights_file(shard, n_shards)), metadata={"format": FORMAT_NAME})


def save_config(path: str | Path, cfg: SAEConfig, shards: list[range], input_scale: float, meta: dict) -> None:
    """Write cfg.json (after every shard file is in). `meta`: hook, model, store, training, ..."""
    exported = replace(cfg, unit_norm_decoder=False)  # rows now carry 1 / input_scale
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "architecture": cfg.architecture,
           "d_model": cfg.d_model, "n_features": cfg.n_features, "config": asdict(exported), **meta,
           "normalization": {"input_scale": input_scale, "folded_into_weights": True,
                             **meta.get("normalization", {})},
           "shards": [{"file": weights_file(i, len(shards)), "features": [r.start, r.stop]}
                      for i, r in enumerate(shards)]}
    Path(path).mkdir(parents=True, exist_ok=True)
    tmp = Path(path) / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(Path(path) / CONFIG_FILE)


def save(sae: SparseAutoencoder, path: str | Path, input_scale: float = 1.0, meta: dict | None = None) -> Path:
    """Export an unsharded SAE from one process."""
    save_shard(sae, path, input_scale, 0, 1)
    save_config(path, sae.cfg, [sae.features], input_scale, meta or {})
    return Path(path)


def read_config(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise InputNotFoundError(f"no exported SAE at {str(path)!r}: {CONFIG_FILE} is missing. Fix: point at "
                                 "the export folder of a training run (<out_dir>/sae)")
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{str(f)!r} is not valid JSON ({e}). Fix: point at another export folder, or "
                                    "re-export the SAE (rerun its training command: it resumes from the last "
                                    "checkpoint and writes <out_dir>/sae again)") from None
    found = (doc.get("format"), doc.get("version")) if isinstance(doc, dict) else (None, None)
    if found != (FORMAT_NAME, FORMAT_VERSION):
        raise CheckpointFormatError(
            f"{str(f)!r} is not a {FORMAT_NAME} checkpoint of version {FORMAT_VERSION} (format={found[0]!r}, "
            f"version={found[1]!r}). Fix: point at the export folder of a training run (<out_dir>/sae); load a "
            "release folder written by `python -m pipeline.publish` with pipeline.publish.load; for a checkpoint of "
            "another version, re-export it with this version of the pipeline (rerun its training command)")
    return doc


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The exported SAE at `path` as one unsharded module in eval mode; `.meta` holds cfg.json.
    A published release (a release folder or hf://owner/repo[/sae_id][@revision], docs/release-format.md)
    loads with pipeline.publish.load, which reads exports too: pipeline.sae imports nothing above it."""
    if str(path).startswith("hf://"):
        raise ConfigError(f"{str(path)!r} is a published release on the Hub, not an exported checkpoint. Fix: load "
                          "it with pipeline.publish.load (it reads releases and exports alike)")
    doc = read_config(path)
    parts = [load_file(str(Path(path) / s["file"])) for s in doc["shards"]]
    tensors = sae_class(doc["config"]["architecture"]).feature_tensors  # sharded along features
    state = {k: v for k, v in parts[0].items() if k not in tensors}
    for name in tensors:
        if name in parts[0]:
            state[name] = torch.cat([p[name] for p in parts])
    return from_state(doc, state, device, f"{str(path)!r}: the weights do not match the {doc['architecture']} SAE its "
                      f"{CONFIG_FILE} describes", "do not mix the files of two exports in one folder; re-export the "
                      "SAE (rerun its training command: it resumes from the last checkpoint and writes <out_dir>/sae "
                      "again)")


def from_state(doc: dict, state: dict, device, mismatch: str, fix: str) -> SparseAutoencoder:
    """The SAE that the exported config document `doc` describes, holding `state` (every tensor but
    the NOT_EXPORTED ones), in eval mode with `.meta = doc`; a mismatch raises CheckpointFormatError
    with `mismatch` and `fix` (the reader of exports and the reader of releases say where and how)."""
    sae = create(SAEConfig(**doc["config"]), device=device)
    missing, unexpected = sae.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in NOT_EXPORTED]
    if unexpected or missing:
        raise CheckpointFormatError(f"{mismatch} (missing {missing}, unexpected {unexpected}). Fix: {fix}")
    sae.meta = doc
    return sae.eval()
