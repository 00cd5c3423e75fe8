"""Configuration of the interpretation stage (`python -m pipeline.interpret`, conf/interpret.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.analysis.collect import FEATURES_PER_PASS
from pipeline.analysis.config import InputConfig
from pipeline.errors import ConfigError

TASKS = ("dashboard", "search", "crosslingual", "attribute")


@dataclass
class InterpretConfig:
    task: str = "dashboard"
    """dashboard (stream a corpus sample, write features.json and the HTML dashboard), search (the
    top features of `prompt`, in the terminal and as search.html), crosslingual (features shared
    by the same sentences in several languages: crosslingual.json and .html) or attribute (the
    features that most raise log p(`target` | `prompt`), confirmed by ablation against density-matched
    random features: attribute.json and .html)."""
    input: InputConfig = field(default_factory=lambda: InputConfig(n_tokens=100_000))
    """The dictionary, its model and the corpus sample whose contexts are shown (training text is
    fine here; pipeline/analysis/config.py). n_tokens is per pass (see features_per_pass); rows
    beyond exclude_norm_factor are never examples and do not count towards density."""
    top_k: int = 20
    """Top-activating contexts kept per feature."""
    n_samples: int = 20
    """Contexts sampled uniformly from each feature's non-zero activations, shown by quantile."""
    n_quantiles: int = 4
    """Groups the samples are shown in (by activation quantile)."""
    context_before: int = 24
    """Tokens shown before an example's token."""
    context_after: int = 8
    """Tokens shown after it."""
    features_per_pass: int = FEATURES_PER_PASS
    """Features collected per pass over the corpus: memory is about features_per_pass x
    (top_k + n_samples) x (context_before + context_after + 1) x 8 bytes; larger dictionaries take
    several passes (the first streams the corpus through model and SAE and keeps the sparse codes, up
    to collect.REPLAY_BYTES; the later ones replay them)."""
    n_logits: int = 10
    """Tokens listed as most promoted and most suppressed by each feature's decoder direction."""
    max_pages: int | None = 20_000
    """Write feature pages for at most this many live features (highest density first); null: all.
    A page is ~60 KB (its examples as highlighted HTML): a million features would be ~60 GB and half
    an hour of writing, so wide dictionaries get pages for their densest features by default; every
    feature stays in the index, features.json and examples.jsonl."""
    out_dir: str = demo.INTERPRET
    """index.html, features/<i>.html, features.json, search.html, crosslingual.{json,html},
    attribute.{json,html}."""
    prompt: str | None = None
    """task=search: the text whose features are listed; task=attribute: the text `target` follows."""
    search_top: int = 5
    """task=search: features listed per token and for the whole prompt (x2)."""
    parallel_file: str | None = None
    """task=crosslingual: JSONL with one object per sentence, {"topic": ..., "en": ..., "de": ..., ...};
    default: the file shipped with the package (pipeline/interpret/parallel.jsonl)."""
    languages: list[str] = field(default_factory=lambda: ["en", "de", "es", "it", "fr"])
    """task=crosslingual: the languages compared."""
    crosslingual_top: int = 10
    """task=crosslingual: the top features per sentence whose overlap across languages is measured."""
    target: str | None = None
    """task=attribute: the next token after `prompt` whose log-probability is attributed; exactly one
    token, usually with its leading space (quoted for Hydra: 'target=" Paris"')."""
    n_attributed: int = 10
    """task=attribute: features kept (highest attribution summed over the prompt's positions), each
    confirmed by ablating it at every position."""
    n_random: int = 10
    """task=attribute: random features of similar density ablated per kept feature, the baseline its
    ablation is compared with."""
    features: str | None = None
    """task=attribute: a features.json (the dashboard's) whose densities the random features are matched
    on; null: out_dir/features.json if it describes this SAE, else densities measured on the corpus
    sample `input` (one pass of input.n_tokens positions)."""
    crosslingual_in_dashboard: bool = True
    """task=dashboard also runs the cross-lingual check (a few seconds) and links its page."""
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {list(TASKS)}")
        if self.task == "search" and not self.prompt:
            raise ConfigError('task=search needs a prompt. Fix: prompt="The Golden Gate Bridge is"')
        if self.task == "attribute" and not (self.prompt and self.target):
            raise ConfigError(f"task=attribute needs a prompt and a target token (prompt={self.prompt!r}, "
                              f"target={self.target!r}). Fix: prompt=\"The capital of France is\" 'target=\" Paris\"'")
        for name in ("top_k", "n_samples", "n_quantiles", "features_per_pass", "n_logits", "search_top",
                     "crosslingual_top", "n_attributed", "n_random"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.context_before < 0 or self.context_after < 0:
            raise ConfigError(f"context_before={self.context_before} and context_after={self.context_after} "
                              "must be >= 0")
        if len(self.languages) < 2:
            raise ConfigError(f"languages={list(self.languages)}: the cross-lingual check needs at least two")
