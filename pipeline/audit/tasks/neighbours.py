"""audit/task=neighbours: each feature's nearest decoder neighbours and a 2-D map of all features
(pipeline/audit/neighbours.py); no model is loaded."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.common import TaskConfig, cosine_bars
from pipeline.audit.neighbours import MAP_METHODS, neighbourhoods, read_data, write_data
from pipeline.audit.splitting import load_decoder
from pipeline.errors import ConfigError

LABEL = "neighbourhoods"
ORDER = 40


@dataclass
class Config(TaskConfig):
    n_neighbours: int = 10
    """Nearest decoder neighbours (cosine) listed per feature."""
    map_method: str = "auto"
    """The 2-D map of all features: umap (umap-learn, on the exact cosine neighbour graph), pca
    (first two principal components of the unit decoder rows) or auto (umap when umap-learn is
    installed, else pca)."""
    map_neighbours: int = 15
    """UMAP's n_neighbors (the neighbourhood size that shapes the map)."""
    seed: int = 0
    """Seed of the UMAP layout."""

    def __post_init__(self):
        if self.n_neighbours < 1 or self.map_neighbours < 2:
            raise ConfigError(f"task.n_neighbours={self.n_neighbours} must be >= 1 and task.map_neighbours="
                              f"{self.map_neighbours} >= 2. Fix: task.n_neighbours=10 task.map_neighbours=15")
        if self.map_method not in MAP_METHODS:
            raise ConfigError(f"task.map_method={self.map_method!r} is not one of {list(MAP_METHODS)}")


def run(cfg) -> dict:
    """The neighbours section of audit.json, and <out_dir>/neighbours.json (cfg: the AuditConfig;
    cfg.task: this module's Config)."""
    task: Config = cfg.task
    decoder, meta = load_decoder(cfg.input.checkpoint)
    found, data = neighbourhoods(decoder, task.n_neighbours, task.map_method, task.map_neighbours, task.seed)
    write_data(Path(cfg.out_dir), data)
    return {"sae": cfg.input.checkpoint, "hook": meta.get("hook"), **found, "dashboard": cfg.dashboard}


def summary(sec: dict) -> str:
    return (f"neighbours: {sec['n_features']} features, median nearest cosine {sec['median_first_cosine']:.3f}, "
            f"{sec['map_method']} map")


# --- report -------------------------------------------------------------------------------------

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


def render(sec: dict, out_dir: Path, max_rows: int = 300) -> str:
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
                       "audit/task=neighbours.</p>")
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
