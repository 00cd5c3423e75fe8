"""Feature neighbourhoods (Scaling Monosemanticity, "Feature Neighborhoods"): each feature's nearest
decoder neighbours by cosine, and a 2-D map of all features.

Neighbours are exact: the unit decoder rows are multiplied block by block (memory: block x
n_features cosines at a time, about 128 MB), so 100k+ features fit. The map is UMAP (umap-learn,
cosine metric, fed the exact neighbour graph computed here) when the package is installed, or the
first two principal components of the unit decoder rows (torch.pca_lowrank) otherwise or when
asked (map_method=pca). Full lists and coordinates go to <out_dir>/neighbours.json; audit.json
holds the summary and that file's name.
"""

from __future__ import annotations

import html
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
        raise ConfigError(f"n_neighbours={n} must be in [1, {F - 1}] for a dictionary of {F} features. "
                          f"Fix: n_neighbours={min(10, max(F - 1, 1))}")
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
        raise ConfigError(f"map_method={method!r} is not one of {list(MAP_METHODS)}")
    have_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not have_umap:
        raise ConfigError("map_method=umap needs the umap-learn package. Fix: pip install umap-learn, or "
                          "map_method=pca")
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


# --- report -----------------------------------------------------------------------------------

def scatter_svg(xy: list[list[float]], colour: list[float], links, max_points: int = 20000, width: int = 720,
                height: int = 520) -> str:
    """Inline SVG scatter of the map: one circle per feature (at most max_points, every k-th), its
    colour the first-neighbour cosine (blue: the lowest in the dictionary, red: the highest),
    linked to the feature's dashboard page."""
    prefix, have = links
    F = len(xy)
    step = max(1, -(-F // max_points))
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    if not xs:
        return "<p class=meta>no features</p>"
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx, sy = (width - 20) / ((x1 - x0) or 1), (height - 20) / ((y1 - y0) or 1)
    r = 2.5 if F <= 5000 else 1.4
    c0, c1 = min(colour), max(colour)
    dots = []
    for i in range(0, F, step):
        t = (colour[i] - c0) / ((c1 - c0) or 1)
        fill = f"rgb({int(40 + 200 * t)},{int(90 + 30 * (1 - t))},{int(220 * (1 - t) + 30)})"
        c = (f'<circle cx="{10 + (xs[i] - x0) * sx:.1f}" cy="{height - 10 - (ys[i] - y0) * sy:.1f}" r="{r}" '
             f'fill="{fill}"><title>feature {i}: nearest cosine {colour[i]:.2f}</title></circle>')
        if prefix is not None and i in have:
            c = f'<a href="{html.escape(prefix)}/{i}.html">{c}</a>'
        dots.append(c)
    return (f'<svg id="feature-map" width="{width}" height="{height}" role="img" aria-label="2-D map of the features" '
            f'style="border:1px solid #e3e6ea">{"".join(dots)}</svg>')


def neighbours_section(sec: dict, out_dir: Path, max_rows: int = 300) -> str:
    from pipeline.analysis.html import feature_link, feature_links
    from pipeline.audit.report import cosine_bars
    links = feature_links(sec.get("dashboard"), out_dir)
    data = read_data(out_dir, sec)
    h = sec["first_cosine_histogram"]
    head = f"""<h2 id="neighbours">Feature neighbourhoods</h2>
<p class="meta">SAE {html.escape(str(sec.get('sae')))} &middot; {sec['n_features']} features &middot; map:
{html.escape(sec['map_method'].upper())} of the unit decoder rows &middot; {sec['n_neighbours']} neighbours per feature
in {html.escape(sec['file'])}</p>
<p>Neighbours: the features whose decoder rows have the highest cosine with the feature's (exact, all pairs).
Map: {'UMAP (cosine metric, ' + str(sec['n_neighbors_umap']) + ' neighbours, on the exact neighbour graph)'
      if sec['map_method'] == 'umap' else 'the first two principal components of the unit decoder rows'};
colour: cosine to the nearest neighbour, from the lowest (blue) to the highest (red) in the dictionary.
Points link to dashboard pages.</p>
<h3>Cosine to the nearest neighbour</h3>{cosine_bars(h['edges'], h['counts'])}
<p class="meta">mean {sec['mean_first_cosine']:.3f}, median {sec['median_first_cosine']:.3f}</p>"""
    if data is None:
        return head + (f"<p class=bad>{html.escape(sec['file'])} is missing next to audit.json: rerun "
                       "task=neighbours.</p>")
    first = [c[0] for c in data["cosine"]]
    scatter = scatter_svg(data["map"], first, links)
    shown = sorted(range(len(first)), key=lambda i: -first[i])[:max_rows]
    rows = "".join(
        f'<tr data-feature="{i}"><td>{feature_link(i, links)}</td><td class="num">{first[i]:.3f}</td><td>'
        + ", ".join(f'{feature_link(j, links)} <span class="meta">({c:.2f})</span>'
                    for j, c in zip(data["neighbours"][i], data["cosine"][i])) + "</td></tr>" for i in shown)
    return (head + f"<h3>Map of all features</h3>{scatter}<p class=\"meta\">colour: nearest cosine {min(first):.2f} "
            f"(blue) to {max(first):.2f} (red)</p>"
            f"<h3>Neighbours (the {len(shown)} features with the closest nearest neighbour; all in "
            f"{html.escape(sec['file'])})</h3><table id=\"neighbour-lists\"><thead><tr><th>feature</th>"
            f"<th>nearest cosine</th><th>neighbours (cosine)</th></tr></thead><tbody>{rows}</tbody></table>")
