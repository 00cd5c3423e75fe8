"""The release layout (docs/release-format.md): one folder per SAE in the layout SAELens reads, plus
our own config, the evaluation results and a manifest. The writer lives here, the reader
in pipeline/analysis/release.py (every stage that takes a dictionary reads releases).

    <release>/README.md                              model card (card.py)
    <release>/<sae_id>/cfg.json                      SAELens config (architecture, d_in, d_sae, ..., metadata)
    <release>/<sae_id>/sae_weights.safetensors       W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
                                                     threshold [d_sae] (jumprelu, batchtopk)
    <release>/<sae_id>/shards/0000i-of-0000n/{cfg.json,sae_weights.safetensors} + sae_weights.safetensors.index.json
                                                     instead, above max_shard_size: each shard a SAELens SAE
                                                     over a feature range (pipeline/saelens_shards.py composes them)
    <release>/<sae_id>/sparsity.safetensors          {"sparsity": log10(feature density + 1e-10)}
    <release>/<sae_id>/pipeline.json                 our exported config (pipeline.sae.checkpoint) + release info
    <release>/<sae_id>/pipeline_extras.safetensors   our exact tensors that SAELens's layout lacks
    <release>/<sae_id>/metrics.json, density_histogram.png, dashboard/   evaluation results
    <release>/<sae_id>/release.json                  manifest (size, sha256 of every other file), written last:
                                                     a folder without it is incomplete

Weights are for raw activations (normalisation folded in by the export), so SAELens's config says
normalize_activations="none". All tensors are float32, copied bit for bit from the export.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from pipeline.analysis.metrics import HISTOGRAM_FILE, METRICS_FILE
from pipeline.analysis.release import (DASHBOARD, EXTRAS, MANIFEST, PIPELINE_CONFIG, RELEASE_FORMAT, RELEASE_VERSION,
                                       SAELENS_CFG, SAELENS_SPARSITY, SAELENS_WEIGHTS, SHARDS, WEIGHTS_INDEX, load)
from pipeline.errors import ConfigError
from pipeline.publish.inputs import saelens_metadata
from pipeline.sae import sae_class

if TYPE_CHECKING:
    from pipeline.publish.neuronpedia import NeuronpediaExport

SAELENS_LAYOUT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: the SAELens config layout we write (6.x; older versions
trigger SAELens's pre-6.0 key renaming)."""
DENSITY_EPS = 1e-10
"""As SAELens: sparsity = log10(density + 1e-10)."""
COMPOSE = {
    "b_dec": "the whole SAE's decoder bias, repeated in every shard: each shard alone is an SAE over its features",
    "encode": "shard i's latents are the whole SAE's latents [start, stop), exactly, for elementwise activations "
              "(standard, jumprelu); for topk, shard i keeps its own top-min(k, size) and the whole SAE's code is "
              "the top k of all shards' codes concatenated",
    "decode": "x_hat = b_dec + sum_i (shard_i.decode(f[..., start_i:stop_i]) - b_dec)"}
"""How the shards of a sharded release compose (written into its index; pipeline/saelens_shards.py does it)."""


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sae_id_for(hook: str | None) -> str:
    """The release sub-folder (SAELens's sae_id) of an SAE: its hook, e.g. model.layers.15."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", hook) if hook else "sae"


def parse_size(value: int | str) -> int:
    """Bytes from 123, "500MB", "5GB", "2GiB"."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {value!r} is not a number of bytes like 500MB, 5GB or 2GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# --- writing ------------------------------------------------------------------------------------

def saelens_state(state: dict[str, torch.Tensor], architecture: str) -> tuple[dict, dict]:
    """(SAELens tensors, extras) from our exported state dict: W_enc as [d_in, d_sae], and what the
    architecture adds (its class's saelens_state: jumprelu, batchtopk a per-latent threshold); extras
    hold what SAELens's layout lacks, so that we reload bit for bit."""
    return sae_class(architecture).saelens_state(state)


def saelens_config(doc: dict, context_size: int | None = None, dataset: str | None = None) -> dict:
    """SAELens's cfg.json from our exported config document; the architecture's SAELens class and
    its own keys come from our class (pipeline/sae/)."""
    cls = sae_class(doc["architecture"])
    cfg = {"architecture": cls.saelens_architecture, "d_in": doc["d_model"], "d_sae": doc["n_features"],
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": cls.saelens_apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none", **cls.saelens_config(doc["config"])}
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
        "hook_head_index": None, "dataset_path": dataset,
        "neuronpedia_id": None, "trained_with": "pipeline", "pipeline_architecture": doc["architecture"],
        "pipeline_hook": doc.get("hook"), **saelens_metadata(doc, context_size)}  # the model and its inputs
    return cfg


@dataclass
class SAESource:
    """What goes into one SAE folder of a release."""

    checkpoint: Path          # exported SAE (pipeline.sae.checkpoint)
    metrics: dict | None      # evaluation metrics.json
    histogram: Path | None    # density histogram PNG
    dashboard: Path | None    # dashboard folder
    density: torch.Tensor | None  # [n_features] fraction of tokens each latent fires on
    sae_id: str | None = None
    neuronpedia: NeuronpediaExport | None = None  # a Neuronpedia export in the folder, its id in cfg.json


def write_sae_folder(src: SAESource, folder: Path, max_shard_bytes: int, context_size: int | None = None,
                     dataset: str | None = None) -> dict:
    """Write one SAE folder (manifest last); returns the manifest."""
    from pipeline.sae.checkpoint import NOT_EXPORTED

    sae = load(src.checkpoint)  # an export, or a folder of another release
    doc = dict(sae.meta)
    state = {k: v.detach().cpu().float() for k, v in sae.state_dict().items() if k not in NOT_EXPORTED}
    tensors, extras = saelens_state(state, doc["architecture"])
    folder.mkdir(parents=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = saelens_config(doc, context_size, dataset)
    if src.neuronpedia is not None:
        cfg["metadata"]["neuronpedia_id"] = src.neuronpedia.neuronpedia_id(doc)
    files = _write_weights(tensors, folder, max(1, math.ceil(total / max_shard_bytes)), cfg)
    if extras:
        save_file(extras, str(folder / EXTRAS), metadata={"format": RELEASE_FORMAT})
    if src.density is not None:
        d = src.density.detach().float().cpu().reshape(-1)
        if d.numel() != doc["n_features"]:
            raise ConfigError(f"feature density of {src.checkpoint} has {d.numel()} entries, the SAE "
                              f"{doc['n_features']} features: the metrics belong to another dictionary")
        save_file({"sparsity": torch.log10(d + DENSITY_EPS).contiguous()}, str(folder / SAELENS_SPARSITY))
    if src.metrics is not None:
        _write_json(folder / METRICS_FILE, src.metrics)
    if src.histogram is not None:
        shutil.copyfile(src.histogram, folder / HISTOGRAM_FILE)
    if src.dashboard is not None:
        shutil.copytree(src.dashboard, folder / DASHBOARD)
    if src.neuronpedia is not None:
        src.neuronpedia.write(folder, doc, cfg)
    ours = {k: v for k, v in doc.items() if k != "shards"}
    ours["release"] = {"format": RELEASE_FORMAT, "version": RELEASE_VERSION, "weights": files,
                       "extras": EXTRAS if extras else None, "saelens_architecture": type(sae).saelens_architecture,
                       "w_enc_layout": "[d_in, d_sae] (transposed from pipeline.sae's [features, d_model])"}
    _write_json(folder / PIPELINE_CONFIG, ours)
    _write_json(folder / SAELENS_CFG, cfg)
    manifest = {"format": RELEASE_FORMAT, "version": RELEASE_VERSION, "sae_id": folder.name,
                "architecture": doc["architecture"], "hook": doc.get("hook"), "files": {}}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            manifest["files"][p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, n_shards: int, cfg: dict) -> list[str]:
    """One sae_weights.safetensors, or n_shards shard folders (each a SAELens SAE: cfg.json and
    sae_weights.safetensors over its features, the whole b_dec) and the index; the files written."""
    meta = {"format": RELEASE_FORMAT}
    if n_shards == 1:
        save_file(tensors, str(folder / SAELENS_WEIGHTS), metadata=meta)
        return [SAELENS_WEIGHTS]
    n_features = cfg["d_sae"]
    n_shards = min(n_shards, n_features)
    bounds = [round(i * n_features / n_shards) for i in range(n_shards + 1)]
    index = {"format": RELEASE_FORMAT, "version": RELEASE_VERSION, "n_features": n_features,
             "architecture": cfg["architecture"], "k": cfg.get("k"), "feature_dim": {"W_enc": 1}, "compose": COMPOSE,
             "note": "features [start, stop) of W_enc (dim 1), W_dec, b_enc, threshold (dim 0); b_dec whole in each",
             "shards": []}
    for i in range(n_shards):
        a, b = bounds[i], bounds[i + 1]
        sub = f"{SHARDS}/{i + 1:05d}-of-{n_shards:05d}"
        (folder / sub).mkdir(parents=True)
        part = {name: (t[:, a:b] if name == "W_enc" else t if name == "b_dec" else t[a:b]).contiguous()
                for name, t in tensors.items()}
        save_file(part, str(folder / sub / SAELENS_WEIGHTS), metadata=meta)
        _write_json(folder / sub / SAELENS_CFG, shard_config(cfg, a, b, i, n_shards))
        index["shards"].append({"folder": sub, "file": f"{sub}/{SAELENS_WEIGHTS}", "features": [a, b]})
    _write_json(folder / WEIGHTS_INDEX, index)
    return [s["file"] for s in index["shards"]]


def shard_config(cfg: dict, start: int, stop: int, i: int, n: int) -> dict:
    """SAELens's cfg.json of shard i of n: the SAE restricted to features [start, stop); a top-k
    shard keeps at most k of its own (COMPOSE says how shards make the whole SAE's code)."""
    out = {**cfg, "d_sae": stop - start,
           "metadata": {**cfg["metadata"], "pipeline_shard": {"index": i, "count": n, "features": [start, stop]}}}
    if "k" in out:
        out["k"] = min(out["k"], stop - start)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


__all__ = ["SAESource", "parse_size", "sae_id_for", "saelens_config", "saelens_state", "write_sae_folder"]
