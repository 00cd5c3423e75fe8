"""The model card (README.md) of a release: Hub metadata, what each SAE is, its metrics, its
training config, the density histogram, how its inputs were made (inputs.py) and how to load it with
pipeline and with SAELens.
Deterministic (no dates), so that republishing the same release changes nothing."""

from __future__ import annotations

import json

import yaml

from pipeline.analysis.html import INDEX_FILE
from pipeline.analysis.metrics import HISTOGRAM_FILE
from pipeline.analysis.release import DASHBOARD
from pipeline.publish.inputs import card_section, hub_id, transformer_lens_name
from pipeline.sae import sae_class


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Scalar entries of a (nested) metrics dict, keys joined by dots; lists left out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: float) -> str:
    return f"{v:d}" if isinstance(v, int) else f"{v:.4g}"


def render(saes: list[dict], *, repo_id: str | None, path_in_repo: str, location: str | None, license: str,
           base_model: str | None, datasets: list[str], tags: list[str], title: str | None) -> str:
    """`saes`: one dict per SAE folder: sae_id, doc (pipeline.json), metrics, has_histogram, has_dashboard."""
    models = {hub_id(s["doc"]) for s in saes}
    if base_model is None and len(models) == 1:
        (base_model,) = models
    archs = sorted({s["doc"]["architecture"] for s in saes})
    meta = {"library_name": "saelens", "license": license,
            "tags": ["sparse-autoencoder", "saelens", "interpretability", "mechanistic-interpretability", "pipeline",
                     *archs, *tags]}
    if base_model:
        meta["base_model"] = base_model
    if datasets:
        meta["datasets"] = list(datasets)
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
    name = title or (f"Sparse autoencoders for {base_model}" if base_model else
                     f"Sparse autoencoders: {repo_id or 'release'}")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             "Sparse autoencoders (dictionaries of features) trained with `pipeline` on a language model's "
             "activations. Each folder holds one SAE in the layout SAELens reads (`cfg.json`, "
             "`sae_weights.safetensors`, `sparsity.safetensors`), its full training config "
             "(`pipeline.json`) and its evaluation (`metrics.json`). The input normalisation used in "
             "training is folded into the weights: feed raw activations.", "",
             "| sae_id | architecture | hook (SAELens) | d_in | features | model |", "|---|---|---|---|---|---|"]
    for s in saes:
        d = s["doc"]
        arch = d["architecture"] + (f" (k={d['config']['k']})" if sae_class(d["architecture"]).uses_k else "")
        lines.append(f"| `{s['sae_id']}` | {arch} | `{transformer_lens_name(d)}` (ours: `{d.get('hook')}`) | "
                     f"{d['d_model']} | {d['n_features']} | `{hub_id(d) or (d.get('model') or {}).get('id')}` |")
    for s in saes:
        d, sid = s["doc"], s["sae_id"]
        lines += ["", f"## `{sid}`", ""]
        flat = flat_metrics(s["metrics"] or {})
        if flat:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
        else:
            lines.append("No evaluation metrics were published with this SAE.")
        if s["has_histogram"]:
            lines += ["", f"![feature density of {sid}]({prefix}{sid}/{HISTOGRAM_FILE})"]
        if s["has_dashboard"]:
            lines += ["", f"Feature dashboard: `{prefix}{sid}/{DASHBOARD}/{INDEX_FILE}` (download the folder and "
                          "open it in a browser)."]
        training = {k: d[k] for k in ("config", "training", "normalization", "store", "model", "hook") if k in d}
        lines += ["", "<details><summary>Training config</summary>", "", "```json",
                  json.dumps(training, indent=2, sort_keys=True), "```", "", "</details>"]
    lines += card_section(saes)
    sid = saes[0]["sae_id"]
    if repo_id:
        ours = f'pipeline.publish.load("hf://{repo_id}/{prefix}{sid}")'
        theirs = f'SAE.from_pretrained("{repo_id}", "{prefix}{sid}")'
    else:
        ours = f'pipeline.publish.load("<download of {location or "this folder"}>/{sid}")'
        theirs = f'SAE.load_from_disk("<download of {location or "this folder"}>/{sid}")'
    lines += ["", "## Loading", "", "With `pipeline` (the module that trained it; bit-identical weights):", "",
              "```python", "import pipeline.publish", f"sae = {ours}",
              "code = sae.encode(x)  # x: raw activations [batch, d_in]; code.values, code.indices: the active latents",
              "latents = code.dense(sae.cfg.n_features)  # [batch, d_sae]", "x_hat = sae(x).x_hat", "```", "",
              "With SAELens (6.x):", "", "```python",
              "from sae_lens import SAE", f"sae = {theirs}", "x_hat = sae.decode(sae.encode(x))", "```", ""]
    for a in archs:  # how an architecture's SAELens form differs from it, where it does
        if sae_class(a).saelens_note:
            lines += [sae_class(a).saelens_note, ""]
    if any(s.get("sharded") for s in saes):
        lines += ["A sharded SAE (`shards/` and `sae_weights.safetensors.index.json` in its folder) loads whole "
                  "with `pipeline.publish.load`. In SAELens each shard folder is an SAE over a feature range "
                  "(`SAE.from_pretrained(repo, \"<sae_id>/shards/00001-of-0000n\")`); "
                  "`pipeline.saelens_shards.ShardedSAE.from_pretrained(repo, \"<sae_id>\")` uses them as one "
                  "(the index's `compose` says how: the decoder bias is repeated in every shard, and a topk "
                  "shard keeps its own top k).", ""]
    return "\n".join(lines)
