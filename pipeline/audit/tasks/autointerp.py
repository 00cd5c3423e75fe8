"""audit/task=autointerp: explain sampled features with an LLM behind an OpenAI-compatible endpoint and
score the explanations (pipeline/audit/autointerp/: its settings are AutointerpConfig)."""

from __future__ import annotations

from pathlib import Path

from pipeline.analysis.html import feature_link, feature_links
from pipeline.audit.autointerp.config import AutointerpConfig as Config
from pipeline.audit.autointerp.report import autointerp_section
from pipeline.audit.autointerp.run import run_autointerp as run

LABEL = "automated interpretability"
ORDER = 70

__all__ = ["Config", "LABEL", "ORDER", "render", "run", "summary"]


def summary(sec: dict) -> str:
    req = sec["requests"]
    return (f"autointerp: {req['made']} requests made, {req['from_cache']} answered from the cache "
            f"({req['cache_dir']})")


def render(sec: dict, out_dir: Path) -> str:
    links = feature_links(sec.get("dashboard"), out_dir)
    return autointerp_section(sec, lambda i: feature_link(i, links))
