"""heldout.json: the held-out metrics of a finished training run, in its out_dir. The trainer
writes it (pipeline/train/heldout.py evaluates the trained module on a held-out store); the
scaling fit reads it (pipeline/scaling). The file's name, format and reader live here, below both
stages, with the names of the rest of a run's out_dir that other stages read (metrics.jsonl,
checkpoints/, sae/).

Keys (values in the training's normalised units, E||x||^2 = d_model over the training store):
    mse          mean over rows of ||x - x_hat||^2
    fvu          sum ||x - x_hat||^2 / sum ||x - mean(x)||^2  (1 - explained variance; Gao et al.'s
                 normalised MSE up to the constant variance / mean-square of the data)
    nmse         sum ||x - x_hat||^2 / sum ||x||^2  (openai/sparse_autoencoder's normalisation)
    l0, sparsity the mean active latents and the weighted sparsity penalty at full lambda
    proxy_loss   mse + sparsity: Scaling Monosemanticity's proxy loss (relu_l1), = mse for topk
    dead_fraction  latents that fired on none of the n_rows held-out rows
    tokens, steps, n_features, architecture, k, d_model: the run, as trained
    point        the configuration that made it (a rerun with another one does not reuse the file)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HELDOUT_FILE = "heldout.json"
METRICS_LOG_FILE = "metrics.jsonl"
"""The trainer's log, a JSON line per logged step (pipeline/train/metrics.py); the scaling fit reads
the last to say how far an unfinished run got."""
CHECKPOINTS_DIR = "checkpoints"
"""The trainer's checkpoints (checkpoints/step-N)."""
EXPORT_DIR = "sae"
"""The trainer's export: the dictionary the analysis stages and publish read (pipeline/sae/checkpoint.py)."""
FORMAT_NAME = "pipeline.heldout"
FORMAT_VERSION = 1


def read(out_dir: str | Path) -> dict | None:
    """out_dir/heldout.json, or None when there is none (ValueError when it is not JSON)."""
    path = Path(out_dir) / HELDOUT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write(out_dir: str | Path, doc: dict) -> Path:
    """Write out_dir/heldout.json whole or not at all: a sweep point counts as finished only once
    the whole file is in."""
    path = Path(out_dir) / HELDOUT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path
