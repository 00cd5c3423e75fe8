"""Feature neighbourhoods (Scaling Monosemanticity, "Feature Neighborhoods"): each feature's nearest
decoder neighbours by cosine, and a 2-D map of all features.

Neighbours are exact: the unit decoder rows are multiplied block by block (memory: block x
n_features cosines at a time, about 128 MB), so 100k+ features fit. The map is UMAP (umap-learn,
cosine metric, fed the exact neighbour graph computed here) when the package is installed, or the
first two principal components of the unit decoder rows (torch.pca_lowrank) otherwise or when
asked (task.map_method=pca). Full lists and coordinates go to <out_dir>/neighbours.json; audit.json
holds the summary and that file's name.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor

from pipeline.errors import ConfigError

NEIGHBOURS_FILE = "neighbours.json"
MAP_METHODS = ("auto", "umap", "pca")


def unit_rows(w: Tensor) -> Tensor:
    w = w.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_neighbours(decoder: Tensor, n: int, block: int | None = None) -> tuple[Tensor, Tensor]:
    """The n features whose decoder rows have the highest cosine with each row of decoder [F, d]
    (the feature itself excluded), best first: (indices [F, n], cosines [F, n])."""
    F = decoder.shape[0]
    if not 1 <= n < F:
        raise ConfigError(f"task.n_neighbours={n} must be in [1, {F - 1}] for a dictionary of {F} features. "
                          f"Fix: task.n_neighbours={min(10, max(F - 1, 1))}")
    u = unit_rows(decoder)
    block = block or max(1, min(8192, 2 ** 25 // F))
    idx, cos = [], []
    for lo in range(0, F, block):
        c = u[lo:lo + block] @ u.t()
        rows = torch.arange(c.shape[0])
        c[rows, rows + lo] = -float("inf")  # not its own neighbour
        v, i = c.topk(n, dim=1)
        idx.append(i)
        cos.append(v)
    return torch.cat(idx), torch.cat(cos)


def resolve_map_method(method: str) -> str:
    if method not in MAP_METHODS:
        raise ConfigError(f"task.map_method={method!r} is not one of {list(MAP_METHODS)}")
    have_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not have_umap:
        raise ConfigError("task.map_method=umap needs the umap-learn package. Fix: pip install umap-learn, or "
                          "task.map_method=pca")
    if method == "auto":
        return "umap" if have_umap else "pca"
    return method


def feature_map(decoder: Tensor, method: str, knn: tuple[Tensor, Tensor] | None = None, n_neighbors: int = 15,
                seed: int = 0) -> tuple[Tensor, str]:
    """[F, 2] coordinates of every feature and the method used. UMAP takes the exact neighbour graph
    `knn` (indices, cosines without the feature itself) when it has at least n_neighbors - 1
    columns; with fewer features than UMAP needs (F <= n_neighbors + 1) the map is PCA."""
    method = resolve_map_method(method)
    u = unit_rows(decoder)
    F = u.shape[0]
    if method == "umap" and F > n_neighbors + 1:
        import warnings

        import numpy as np
        import umap
        pre = (None, None, None)
        if knn is not None and knn[0].shape[1] >= n_neighbors - 1:
            i, c = knn[0][:, :n_neighbors - 1], knn[1][:, :n_neighbors - 1]
            # UMAP's graph lists each point as its own first neighbour, at distance 0
            ids = torch.cat([torch.arange(F)[:, None], i], 1).numpy().astype(np.int64)
            dist = torch.cat([torch.zeros(F, 1), (1 - c).clamp_min(0)], 1).numpy().astype(np.float32)
            pre = (ids, dist, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seeded UMAP runs single-threaded, and says so
            xy = umap.UMAP(n_neighbors=n_neighbors, metric="cosine", random_state=seed, precomputed_knn=pre,
                           init="spectral" if F > 2 * n_neighbors else "random").fit_transform(u.numpy())
        return torch.from_numpy(np.asarray(xy, dtype=np.float32)), "umap"
    if F < 3:
        return torch.zeros(F, 2), "pca"
    torch.manual_seed(seed)
    _, _, v = torch.pca_lowrank(u, q=2, center=True)
    return (u - u.mean(0)) @ v[:, :2], "pca"


def neighbourhoods(decoder: Tensor, n: int = 10, method: str = "auto", n_neighbors: int = 15,
                   seed: int = 0) -> tuple[dict, dict]:
    """(summary for audit.json, full data for neighbours.json) of a dictionary's decoder rows [F, d]."""
    F = decoder.shape[0]
    k = min(max(n, n_neighbors - 1), F - 1)
    idx, cos = nearest_neighbours(decoder, k)
    xy, used = feature_map(decoder, method, (idx, cos), n_neighbors, seed)
    first = cos[:, 0]
    hist = torch.histc(first, bins=20, min=-1.0, max=1.0)
    order = torch.argsort(first, descending=True, stable=True)
    pairs, seen = [], set()
    for i in order.tolist():
        j = int(idx[i, 0])
        if (j, i) in seen:
            continue
        seen.add((i, j))
        pairs.append({"a": i, "b": j, "cosine": round(float(first[i]), 4)})
        if len(pairs) == 50:
            break
    summary = {"n_features": F, "n_neighbours": n, "map_method": used, "n_neighbors_umap": n_neighbors,
               "mean_first_cosine": float(first.mean()), "median_first_cosine": float(first.median()),
               "first_cosine_histogram": {"edges": [round(-1 + 0.1 * i, 2) for i in range(21)],
                                          "counts": [int(x) for x in hist]},
               "top_pairs": pairs, "file": NEIGHBOURS_FILE}
    data = {"neighbours": idx[:, :n].tolist(),
            "cosine": [[round(x, 4) for x in r] for r in cos[:, :n].tolist()],
            "map": [[round(x, 4) for x in r] for r in xy.tolist()]}
    return summary, data


def write_data(out_dir: Path, data: dict) -> Path:
    from pipeline.analysis import html as H
    path = Path(out_dir) / NEIGHBOURS_FILE
    H.write(path, json.dumps(data, separators=(",", ":")) + "\n")
    return path


def read_data(out_dir: Path, sec: dict) -> dict | None:
    path = Path(out_dir) / sec.get("file", NEIGHBOURS_FILE)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
