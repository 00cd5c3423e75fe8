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

from pipeline.errors import InputNotFoundError
from pipeline.sae.base import SAEConfig, SparseAutoencoder

FORMAT_NAME = "pipeline.sae"
FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NOT_EXPORTED = ("tokens_since_fired", "threshold_steps")  # training state only


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
    doc = json.loads(f.read_text())
    if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{f} is not a {FORMAT_NAME} checkpoint of version {FORMAT_VERSION} "
                         f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
    return doc


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The exported SAE at `path` as one unsharded module in eval mode; `.meta` holds cfg.json.
    `path` may also be a published release folder or hf://owner/repo[/sae_id][@revision]
    (pipeline.publish, docs/release-format.md): the same module, bit for bit."""
    from pipeline.sae import create

    from pipeline.publish import release  # the release layout's reader lives with its writer
    if str(path).startswith("hf://") or release.is_release(path):
        return release.load(path, device)
    doc = read_config(path)
    sae = create(SAEConfig(**doc["config"]), device=device)
    parts = [load_file(str(Path(path) / s["file"])) for s in doc["shards"]]
    state = {k: v for k, v in parts[0].items() if k not in sae.feature_tensors}
    for name in sae.feature_tensors:
        if name in parts[0]:
            state[name] = torch.cat([p[name] for p in parts])
    missing, unexpected = sae.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(NOT_EXPORTED):
        raise ValueError(f"{path}: weights do not match a {doc['architecture']} SAE "
                         f"(missing {missing}, unexpected {unexpected})")
    sae.meta = doc
    return sae.eval()
