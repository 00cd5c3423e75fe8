"""Configuration of the audit stage (`python -m pipeline.audit`, conf/audit.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.analysis.config import InputConfig
from pipeline.audit.autointerp.config import AutointerpConfig
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig

TASKS = ("concepts", "splitting", "crossmodal", "neighbours", "completeness", "absorption", "autointerp")

NEUTRAL_PROMPTS = [
    "I would like to tell you about",
    "The next thing we talked about was",
    "Here is a short story about",
    "My favourite topic is",
]


@dataclass
class AuditConfig:
    task: str = "concepts"
    """concepts (rank features by how well they separate each concept set's prompts, check the top
    ones on held-out prompts and by steering) or splitting (match the features of two dictionaries
    of different sizes on the same hook by decoder cosine). Each task writes its own section of
    audit.json; sections of the other task already there are kept, and audit.html shows them all."""
    input: InputConfig = field(default_factory=InputConfig)
    """The dictionary (for task=concepts, crossmodal, neighbours, completeness, absorption, autointerp),
    its model and hook, and exclude_positions_below: positions below it are left out of the
    per-prompt max and mean (position 0 is BOS). pipeline/analysis/config.py."""
    concepts: list[str] = field(default_factory=list)
    """Concept sets: names of sets shipped in pipeline/audit/concepts/ (water, deception, ...) or
    paths to YAML files of the same form. Empty: every shipped set."""
    top: int = 5
    """Features per concept set reported, checked on the held-out prompts and by steering."""
    clamp_multiple: float = 2.0
    """The steering check clamps each top feature to this multiple of its largest activation on
    the concept's positive prompts (error term kept, as in pipeline.steer). What a multiple adds
    depends on the dictionary's scale: read added_norm_ratio in the report and aim at ~0.1-0.2 of
    the residual norm. The topk demo dictionary (unit-norm decoder rows): 2x adds 14-20% (KL to the
    clean next token 0.04-0.12); 10x adds 70-100% and breaks the distribution (KL 1.3-4.3). A
    relu_l1 dictionary with small decoder rows needs more (an earlier relu_l1 demo: 20x for 10-20%)."""
    neutral_prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """Prompts after which the steering check measures the change in log-probability of the
    concept words (each word with a leading space, all its tokens) and the next-token KL."""
    dashboard: str | None = demo.INTERPRET
    """The interpretation stage's dashboard folder: features with a page there are linked (for
    task=splitting: the small dictionary's dashboard). null or missing: no links."""
    small: str | None = None
    """task=splitting: the smaller exported SAE."""
    large: str | None = None
    """task=splitting: the larger exported SAE on the same hook."""
    large_dashboard: str | None = None
    """task=splitting: the large dictionary's dashboard folder, for links."""
    threshold: float = 0.7
    """task=splitting: a large-dictionary feature is a child of the small-dictionary feature whose
    decoder row is closest in cosine if that cosine is at least this; otherwise it is novel."""
    # task=crossmodal -------------------------------------------------------------------------
    vlm: ModelConfig = field(default_factory=lambda: ModelConfig(name="HuggingFaceTB/SmolVLM-256M-Instruct"))
    """task=crossmodal: the vision-language model whose language model the dictionary was trained on
    (SmolVLM-256M: SmolLM2-135M's shape). Its text hidden size must equal the dictionary's d_model."""
    vlm_hook: str | None = None
    """task=crossmodal: the VLM module the dictionary reads; default: the checkpoint hook's block in
    the VLM's text model (model.layers.15 -> model.text_model.layers.15)."""
    vlm_data: DataConfig = field(default_factory=lambda: DataConfig(split="test"))
    """task=crossmodal: held-out text for the text-only FVU and CE loss recovered."""
    vlm_tokens: int = 16_384
    """task=crossmodal: text-only evaluation positions (contexts x vlm_context_size)."""
    vlm_context_size: int = 128
    vlm_batch_size: int = 8
    vlm_image_splitting: bool = False
    """task=crossmodal: false: one tile per image (SmolVLM-256M: 64 image rows); true: the
    processor's tiling of large images."""
    vlm_baseline: bool = True
    """task=crossmodal: also evaluate on `model` (the language model the dictionary was trained on)
    with the same text, for comparison."""
    # task=neighbours -------------------------------------------------------------------------
    n_neighbours: int = 10
    """task=neighbours: nearest decoder neighbours (cosine) listed per feature."""
    map_method: str = "auto"
    """task=neighbours: the 2-D map of all features: umap (umap-learn, on the exact cosine
    neighbour graph), pca (first two principal components of the unit decoder rows) or auto (umap
    when umap-learn is installed, else pca)."""
    map_neighbours: int = 15
    """task=neighbours: UMAP's n_neighbors (the neighbourhood size that shapes the map)."""
    # task=completeness -----------------------------------------------------------------------
    categories: list[str] = field(default_factory=list)
    """task=completeness: concept lists: names shipped in pipeline/audit/concept_lists/ (elements,
    cities, animals) or paths to YAML files of the same form. Empty: every shipped list."""
    corpus: DataConfig = field(default_factory=DataConfig)
    """task=completeness: the text the activation store was cached from (default: the embedded
    corpus's train split, the cache stage's default): concept frequencies and alive features."""
    max_documents: int = 100_000
    """task=completeness: concept hits are counted in at most this many documents of corpus."""
    alive_tokens: int = 32_768
    """task=completeness: a feature is alive if it fires on one of this many tokens of corpus."""
    dedicated_auroc: float = 0.99
    """task=completeness: a concept has a dedicated feature when one fires on its name in at least
    min_fire_fraction of the template sentences, on at most max_density of corpus tokens, and
    separates its name from every other name and every other token of the sentences with at least
    this AUROC (docs/audit.md)."""
    min_fire_fraction: float = 0.5
    """task=completeness: see dedicated_auroc."""
    max_density: float = 1e-3
    """task=completeness: see dedicated_auroc (density over the alive_tokens pass)."""
    uniqueness: float = 2.0
    """task=completeness: ... and its mean activation on the name is at least this multiple of its
    mean on any other name of any list."""
    # task=absorption -------------------------------------------------------------------------
    absorption_words: int = 3000
    """task=absorption: words (single vocabulary tokens, a space plus letters) sampled for the
    first-letter task, 80% train, 20% test."""
    absorption_max_k: int = 10
    """task=absorption: the largest k of the k-sparse probes that pick each letter's main latents."""
    absorption_f1_jump: float = 0.03
    """task=absorption: a letter's main latents grow from k to k+1 while the test F1 rises by more."""
    seed: int = 0
    """task=neighbours, absorption: seed of the UMAP layout and of the word sample."""
    # task=autointerp --------------------------------------------------------------------------
    autointerp: AutointerpConfig = field(default_factory=AutointerpConfig)
    """task=autointerp: explain sampled features with an LLM behind an OpenAI-compatible endpoint
    (default: pipeline.audit.server with the embedded SmolLM2-135M-Instruct, a plumbing check) and
    score the explanations; every field in pipeline/audit/autointerp/config.py."""
    out_dir: str = demo.AUDIT
    """audit.json and audit.html are written here."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {list(TASKS)}")
        if self.top < 1:
            raise ConfigError(f"top={self.top} must be at least 1 (features reported per concept set)")
        if self.clamp_multiple == 0:
            raise ConfigError("clamp_multiple=0 would clamp every feature to 0 (ablation, not steering toward the "
                              "concept). Fix: e.g. clamp_multiple=5")
        if self.task == "concepts" and not self.neutral_prompts:
            raise ConfigError("neutral_prompts is empty; the steering check needs at least one prompt. Fix: e.g. "
                              "neutral_prompts=[\"I would like to tell you about\"]")
        if any(not str(p).strip() for p in self.neutral_prompts):
            raise ConfigError(f"neutral_prompts={list(self.neutral_prompts)} holds an empty prompt; the steering "
                              "check reads the next token after each. Fix: remove it")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold={self.threshold} is a cosine similarity and must lie in [-1, 1]")
        if self.task == "crossmodal" and (self.vlm_tokens < 1 or self.vlm_batch_size < 1 or
                                          not 0 <= self.input.exclude_positions_below < self.vlm_context_size):
            raise ConfigError(f"task=crossmodal needs vlm_tokens={self.vlm_tokens} >= 1, vlm_batch_size="
                              f"{self.vlm_batch_size} >= 1 and input.exclude_positions_below={self.input.exclude_positions_below} "
                              f"< vlm_context_size={self.vlm_context_size}")
        if self.n_neighbours < 1 or self.map_neighbours < 2:
            raise ConfigError(f"n_neighbours={self.n_neighbours} must be >= 1 and map_neighbours={self.map_neighbours} "
                              ">= 2. Fix: n_neighbours=10 map_neighbours=15")
        if self.map_method not in ("auto", "umap", "pca"):
            raise ConfigError(f"map_method={self.map_method!r} is not one of ['auto', 'umap', 'pca']")
        if (not 0.5 <= self.dedicated_auroc <= 1.0 or not 0.0 < self.min_fire_fraction <= 1.0
                or not 0.0 < self.max_density <= 1.0 or self.uniqueness < 1.0):
            raise ConfigError(f"dedicated_auroc={self.dedicated_auroc} must lie in [0.5, 1], min_fire_fraction="
                              f"{self.min_fire_fraction} and max_density={self.max_density} in (0, 1], uniqueness="
                              f"{self.uniqueness} >= 1. Fix: dedicated_auroc=0.99 min_fire_fraction=0.5 "
                              "max_density=0.001 uniqueness=2")
        if self.max_documents < 1 or self.alive_tokens < 1:
            raise ConfigError(f"max_documents={self.max_documents} and alive_tokens={self.alive_tokens} must be >= 1")
        if self.absorption_words < 100 or self.absorption_max_k < 1:
            raise ConfigError(f"absorption_words={self.absorption_words} must be >= 100 (26 letters, 80/20 split) and "
                              f"absorption_max_k={self.absorption_max_k} >= 1. Fix: absorption_words=3000")
        if self.task == "splitting" and not (self.small and self.large):
            raise ConfigError(f"task=splitting needs two exported SAEs on the same hook; got small={self.small!r}, "
                              f"large={self.large!r}. Fix: small=runs/sae-1k large=runs/sae-4k")
