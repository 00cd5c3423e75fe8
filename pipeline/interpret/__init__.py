"""Stage 3b: what each feature means, as a static HTML dashboard; feature search; cross-lingual check;
attribution of a next token to features (confirmed by ablation).

    python -m pipeline.interpret                                  # features.json + index.html + pages
    python -m pipeline.interpret task=search prompt="The Golden Gate Bridge"
    python -m pipeline.interpret task=crosslingual
    python -m pipeline.interpret task=attribute prompt="The capital of France is" 'target=" Paris"'

Output: <out_dir>/index.html (open it from disk: no server, no network), features/<i>.html,
features.json (per-feature density, max activation, logit effects: the steering stage reads it),
search.html, crosslingual.{json,html}, attribute.{json,html}."""

from pipeline.interpret.config import InterpretConfig
from pipeline.interpret.run import build_dashboard, run, run_crosslingual, run_search

__all__ = ["InterpretConfig", "build_dashboard", "run", "run_crosslingual", "run_search"]
