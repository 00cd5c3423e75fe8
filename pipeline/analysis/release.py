"""Reading the release layout (docs/release-format.md; pipeline.publish writes it): one folder per
SAE in the layout SAELens reads, plus our config, extras and a manifest written last. Any stage
that takes a dictionary reads a release through here, local or `hf://owner/repo[/sae_id][@revision]`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.errors import ConfigError, UserError

RELEASE_FORMAT = "pipeline.release"
RELEASE_VERSION = 2
"""2: sharded weights in shards/<i>-of-<n>/ folders that SAELens loads one by one (1: sae_weights-*-of-*
files beside cfg.json, which read_weights still reads)."""
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
WEIGHTS_INDEX = "sae_weights.safetensors.index.json"
SHARDS = "shards"
"""A sharded SAE's folder of shard folders, each a SAELens SAE over a feature range (pipeline/saelens_shards.py)."""
PIPELINE_CONFIG = "pipeline.json"
EXTRAS = "pipeline_extras.safetensors"
DASHBOARD = "dashboard"
"""The SAE folder's copy of the interpretation stage's dashboard; the evaluation's files keep their own
names (pipeline/analysis/metrics.py METRICS_FILE, HISTOGRAM_FILE)."""
MANIFEST = "release.json"
CARD = "README.md"

class ReleaseIncompleteError(UserError, OSError):
    """A release folder has no manifest, or its files do not match it: it was never finished."""


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
        if not p.is_file() and name not in (PIPELINE_CONFIG, SAELENS_CFG) and not name.startswith(("sae_weights",
                                                                                                 SHARDS + "/")):
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
    from pipeline.sae.checkpoint import from_state

    if str(path).startswith("hf://"):
        path = download(str(path))
    folder = Path(path)
    check_complete(folder)
    doc = json.loads((folder / PIPELINE_CONFIG).read_text())
    w = read_weights(folder)
    state = {"W_enc": w["W_enc"].t().contiguous(), "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
    if doc["release"].get("extras"):
        state.update(_load(folder / doc["release"]["extras"]))
    return from_state(doc, state, device, f"{str(folder)!r}: the weights do not match the {doc['architecture']} SAE "
                      f"its {PIPELINE_CONFIG} describes", "download the release again, or rebuild it from the export "
                      "with `python -m pipeline.publish`")


def parse_hf_url(url: str) -> tuple[str, str, str | None]:
    """hf://owner/repo[/sub/folder][@revision] -> (repo_id, sub folder, revision)."""
    rest = url[len("hf://"):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise ConfigError(f"{url!r} is not hf://owner/repo[/folder][@revision]. Fix: name the repo and the SAE's "
                          "folder in it, e.g. hf://my-org/smollm2-saes/model.layers.15@main")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision


def download(url: str) -> Path:
    """The local snapshot of an SAE folder of a release on the Hub (what load needs, not the dashboard)."""
    from huggingface_hub import snapshot_download
    repo_id, sub, revision = parse_hf_url(url)
    pre = f"{sub}/" if sub else ""
    patterns = [pre + n for n in (SAELENS_CFG, PIPELINE_CONFIG, MANIFEST, "sae_weights*", SHARDS + "/*", EXTRAS)]
    root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                             endpoint=os.environ.get("HF_ENDPOINT") or None)
    return Path(root) / sub
