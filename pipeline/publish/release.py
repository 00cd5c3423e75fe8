"""The release layout (docs/release-format.md): one folder per SAE in the layout SAELens reads, plus
our own config, the evaluation results and a manifest. The writer and the reader live here.

    <release>/README.md                              model card (card.py)
    <release>/<sae_id>/cfg.json                      SAELens config (architecture, d_in, d_sae, ..., metadata)
    <release>/<sae_id>/sae_weights.safetensors       W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
                                                     threshold [d_sae] (jumprelu, batchtopk)
    <release>/<sae_id>/sae_weights-0000i-of-0000n.safetensors + sae_weights.safetensors.index.json
                                                     instead, above max_shard_size: feature slices
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

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import ConfigError, UserError

RELEASE_FORMAT = "pipeline.release"
RELEASE_VERSION = 1
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
WEIGHTS_INDEX = "sae_weights.safetensors.index.json"
PIPELINE_CONFIG = "pipeline.json"
EXTRAS = "pipeline_extras.safetensors"
METRICS = "metrics.json"
HISTOGRAM = "density_histogram.png"
DASHBOARD = "dashboard"
MANIFEST = "release.json"
CARD = "README.md"
SAELENS_LAYOUT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: the SAELens config layout we write (6.x; older versions
trigger SAELens's pre-6.0 key renaming)."""
DENSITY_EPS = 1e-10
"""As SAELens: sparsity = log10(density + 1e-10)."""

# our architecture -> (SAELens inference architecture, apply_b_dec_to_input)
SAELENS_ARCH = {"relu_l1": ("standard", False), "topk": ("topk", True),
                "jumprelu": ("jumprelu", False), "batchtopk": ("jumprelu", True)}
_LAYER_HOOK = re.compile(r"^(?:model\.layers|layers|transformer\.h|gpt_neox\.layers|model\.decoder\.layers)\.(\d+)$")


class ReleaseIncompleteError(UserError, OSError):
    """A release folder has no manifest, or its files do not match it: it was never finished."""


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def transformer_lens_hook(hook: str | None) -> str | None:
    """SAELens names hooks as TransformerLens does: a decoder layer's output is blocks.N.hook_resid_post."""
    m = _LAYER_HOOK.match(hook or "")
    return f"blocks.{m.group(1)}.hook_resid_post" if m else hook


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
    """(SAELens tensors, extras) from our exported state dict. SAELens keeps W_enc as [d_in, d_sae]
    and a per-latent threshold; extras hold what it lacks, so that we reload bit for bit."""
    out = {"W_enc": state["W_enc"].t().contiguous(), "W_dec": state["W_dec"].contiguous(),
           "b_enc": state["b_enc"].contiguous(), "b_dec": state["b_dec"].contiguous()}
    extras = {}
    if architecture == "jumprelu":
        out["threshold"] = state["log_threshold"].exp()
        extras["log_threshold"] = state["log_threshold"].contiguous()
    elif architecture == "batchtopk":
        out["threshold"] = state["threshold"].expand(state["b_enc"].shape[0]).contiguous()
        extras["threshold"] = state["threshold"].reshape(()).contiguous()
    return out, extras


def saelens_config(doc: dict, context_size: int | None = None, dataset: str | None = None) -> dict:
    """SAELens's cfg.json from our exported config document."""
    arch, apply_b_dec = SAELENS_ARCH[doc["architecture"]]
    cfg = {"architecture": arch, "d_in": doc["d_model"], "d_sae": doc["n_features"], "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "reshape_activations": "none"}
    if arch == "topk":
        cfg.update(k=doc["config"]["k"], rescale_acts_by_decoder_norm=False)
    model = doc.get("model") or {}
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
        "model_name": model.get("id"), "hook_name": transformer_lens_hook(doc.get("hook")),
        "hook_head_index": None, "prepend_bos": True, "context_size": context_size, "dataset_path": dataset,
        "neuronpedia_id": None, "trained_with": "pipeline", "pipeline_architecture": doc["architecture"],
        "pipeline_hook": doc.get("hook"), "model_revision": model.get("revision")}
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
    n_shards = max(1, math.ceil(total / max_shard_bytes))
    files = _write_weights(tensors, folder, n_shards, doc["n_features"])
    if extras:
        save_file(extras, str(folder / EXTRAS), metadata={"format": RELEASE_FORMAT})
    if src.density is not None:
        d = src.density.detach().float().cpu().reshape(-1)
        if d.numel() != doc["n_features"]:
            raise ConfigError(f"feature density of {src.checkpoint} has {d.numel()} entries, the SAE "
                              f"{doc['n_features']} features: the metrics belong to another dictionary")
        save_file({"sparsity": torch.log10(d + DENSITY_EPS).contiguous()}, str(folder / SAELENS_SPARSITY))
    if src.metrics is not None:
        _write_json(folder / METRICS, src.metrics)
    if src.histogram is not None:
        shutil.copyfile(src.histogram, folder / HISTOGRAM)
    if src.dashboard is not None:
        shutil.copytree(src.dashboard, folder / DASHBOARD)
    ours = {k: v for k, v in doc.items() if k != "shards"}
    ours["release"] = {"format": RELEASE_FORMAT, "version": RELEASE_VERSION, "weights": files,
                       "extras": EXTRAS if extras else None, "saelens_architecture": SAELENS_ARCH[doc["architecture"]][0],
                       "w_enc_layout": "[d_in, d_sae] (transposed from pipeline.sae's [features, d_model])"}
    _write_json(folder / PIPELINE_CONFIG, ours)
    _write_json(folder / SAELENS_CFG, saelens_config(doc, context_size, dataset))
    manifest = {"format": RELEASE_FORMAT, "version": RELEASE_VERSION, "sae_id": folder.name,
                "architecture": doc["architecture"], "hook": doc.get("hook"), "files": {}}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            manifest["files"][p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, n_shards: int, n_features: int) -> list[str]:
    meta = {"format": RELEASE_FORMAT}
    if n_shards == 1:
        save_file(tensors, str(folder / SAELENS_WEIGHTS), metadata=meta)
        return [SAELENS_WEIGHTS]
    n_shards = min(n_shards, n_features)
    bounds = [round(i * n_features / n_shards) for i in range(n_shards + 1)]
    index = {"format": RELEASE_FORMAT, "n_features": n_features, "feature_dim": {"W_enc": 1},
             "note": "features [start, stop) of W_enc (dim 1), W_dec, b_enc, threshold (dim 0); b_dec in shard 1",
             "shards": []}
    for i in range(n_shards):
        a, b = bounds[i], bounds[i + 1]
        part = {"W_enc": tensors["W_enc"][:, a:b].contiguous(), "W_dec": tensors["W_dec"][a:b].contiguous(),
                "b_enc": tensors["b_enc"][a:b].contiguous()}
        if "threshold" in tensors:
            part["threshold"] = tensors["threshold"][a:b].contiguous()
        if i == 0:
            part["b_dec"] = tensors["b_dec"]
        name = f"sae_weights-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(part, str(folder / name), metadata=meta)
        index["shards"].append({"file": name, "features": [a, b]})
    _write_json(folder / WEIGHTS_INDEX, index)
    return [s["file"] for s in index["shards"]]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- reading ------------------------------------------------------------------------------------

def is_release(path) -> bool:
    """Whether `path` (a local folder) is an SAE folder of a release."""
    return (Path(path) / PIPELINE_CONFIG).is_file() or (Path(path) / MANIFEST).is_file()


def check_complete(folder: Path) -> dict:
    """The manifest of a release SAE folder; raises ReleaseIncompleteError if it is absent, or a
    file it lists has another size, or a config or weights file it lists is missing."""
    f = folder / MANIFEST
    if not f.is_file():
        raise ReleaseIncompleteError(
            f"{folder} is not a complete release: {MANIFEST} is missing (it is written, and uploaded, last). "
            "Fix: rerun the same `python -m pipeline.publish` command to finish it")
    manifest = json.loads(f.read_text())
    for name, info in manifest["files"].items():
        p = folder / name
        if not p.is_file() and name not in (PIPELINE_CONFIG, SAELENS_CFG) and not name.startswith("sae_weights"):
            continue  # a download for loading leaves the metrics, sparsity and dashboard out
        if not p.is_file() or p.stat().st_size != info["size"]:
            raise ReleaseIncompleteError(f"{folder}: {name} is missing or has the wrong size (the manifest says "
                                         f"{info['size']} bytes). Fix: rerun the publish command, or download again")
    return manifest


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The SAELens tensors of a release folder, whole (shards concatenated)."""
    if (folder / SAELENS_WEIGHTS).is_file():
        return _load(folder / SAELENS_WEIGHTS)
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    parts = [_load(folder / s["file"]) for s in index["shards"]]
    out = {"b_dec": parts[0]["b_dec"], "W_enc": torch.cat([p["W_enc"] for p in parts], dim=1)}
    for name in ("W_dec", "b_enc", "threshold"):
        if name in parts[0]:
            out[name] = torch.cat([p[name] for p in parts])
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load(path, device: str | torch.device = "cpu"):
    """Any SAE this pipeline writes, as one unsharded module in eval mode: a release folder or
    `hf://owner/repo[/sae_id][@revision]` (load_release), else an exported checkpoint (pipeline.sae.load)."""
    from pipeline.sae import load as load_export

    if str(path).startswith("hf://") or is_release(path):
        return load_release(path, device)
    return load_export(path, device)


def load_release(path, device: str | torch.device = "cpu"):
    """The SAE of a release folder, or of `hf://owner/repo[/sae_id][@revision]`, as pipeline.sae.load
    returns its export (same module, same tensors bit for bit); `.meta` holds pipeline.json."""
    from pipeline.sae import SAEConfig, create
    from pipeline.sae.checkpoint import NOT_EXPORTED, CheckpointFormatError

    if str(path).startswith("hf://"):
        from pipeline.publish.hub import download
        path = download(str(path))
    folder = Path(path)
    check_complete(folder)
    doc = json.loads((folder / PIPELINE_CONFIG).read_text())
    w = read_weights(folder)
    state = {"W_enc": w["W_enc"].t().contiguous(), "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
    if doc["release"].get("extras"):
        state.update(_load(folder / doc["release"]["extras"]))
    sae = create(SAEConfig(**doc["config"]), device=device)
    missing, unexpected = sae.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in NOT_EXPORTED]
    if unexpected or missing:
        raise CheckpointFormatError(
            f"{str(folder)!r}: the weights do not match the {doc['architecture']} SAE its {PIPELINE_CONFIG} describes "
            f"(missing {missing}, unexpected {unexpected}). Fix: download the release again, or rebuild it from "
            "the export with `python -m pipeline.publish`")
    sae.meta = doc
    return sae.eval()


__all__ = ["CARD", "MANIFEST", "ReleaseIncompleteError", "SAESource", "check_complete", "is_release", "load",
           "load_release", "parse_size", "read_weights", "sae_id_for", "saelens_config", "saelens_state",
           "write_sae_folder"]
