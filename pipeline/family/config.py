"""Configuration of the dictionary family (`python -m pipeline.family`, conf/family.yaml, `make family`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError

STEPS = ("corpus", "cache", "train", "sweep", "evaluate", "interpret", "audit", "steer", "attribute", "publish", "report")

ATTRIBUTION_PROMPTS = [
    {"prompt": "The capital of France is", "target": " Paris"},
    {"prompt": "To install a package on Debian, run apt", "target": "-"},
    {"prompt": "In Python, a function is defined with the keyword", "target": " def"},
    {"prompt": "Die Hauptstadt von Deutschland ist", "target": " Berlin"},
]


@dataclass
class FamilyConfig:
    sizes: list[int] = field(default_factory=lambda: [4096, 16384, 65536])
    """Dictionary sizes (features), smallest first; each is trained on the same tokens in the same order."""
    model_name: str = "embedded:smollm2-135m"
    """The language model (model.name of every stage: a Hub id, a local folder or embedded:<name>)."""
    hook: str = "model.layers.15"
    """The module whose output is cached and reconstructed."""
    architecture: str = "topk"
    """The `sae=` option every size is trained with (conf/sae/)."""
    n_tokens: int = 5_200_000
    """Training tokens: cached once from the corpus's train split, one pass for every size."""
    test_tokens: int = 300_000
    """Held-out tokens cached from the test split (each run's heldout.json reads them)."""
    corpus: str | None = None
    """The family corpus folder (pipeline/family/corpus.py); null: PIPELINE_FAMILY_CORPUS or
    <cache>/family-corpus, built there from Debian's archive if absent."""
    out_dir: str = "runs/family"
    """activations/, train/<size>/, evaluate/<size>/, interpret/<size>/, audit/<size>/ (and audit/<small>-<large>/
    for splitting), steer/<size>/, attribute/<size>/<i>/, release/ (one folder per size), commands.sh
    (every command run, in order) and, by default, the report."""
    report: str | None = None
    """The report's path; its figures go to the folder of the same name without .md. null:
    <out_dir>/report/results.md (make family writes docs/results.md and docs/results/)."""
    nproc: int = 1
    """Processes per training run (features sharded across them: parallel.feature_parallel)."""
    eval_tokens: int = 50_000
    """Held-out text positions for pipeline.evaluate (CE loss recovered, KL, ...)."""
    interpret_tokens: int = 100_000
    """Corpus positions per pass for the dashboards (max activations, densities, examples)."""
    max_pages: int = 1000
    """Feature pages written per dashboard (densest first); features.json covers every feature."""
    completeness_documents: int = 20_000
    """Corpus documents in which concept names are counted (audit/task=completeness)."""
    attribution_prompts: list[dict] = field(default_factory=lambda: [dict(p) for p in ATTRIBUTION_PROMPTS])
    """{prompt, target} pairs for interpret task=attribute, run on every size."""
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    """Steps to run, in this order; each skips work already done (the stages' own resume), so a killed
    family is resumed by running the same command again."""
    checkpoint_every: int = 100
    """Optimizer steps between training checkpoints: the largest size trains for over an hour on 2 cores,
    and a killed family resumes from the last checkpoint (the trainer's default, 1,000, is most of a run)."""
    train_args: list[str] = field(default_factory=list)
    """Extra overrides for every pipeline.train run, quoted for Hydra: train_args='["batch_size=2048"]'."""
    sweep_args: list[str] = field(default_factory=lambda: [
        "sae.n_features=512,1024,2048,4096", "n_tokens=204800,409600,819200,1638400", "optim.lr=null"])
    """Overrides for the scaling-law sweep (conf/sweep/gao.yaml, on the family's stores, its lr left to the
    recipe) whose fit (pipeline.scaling) the report compares with Gao et al.'s."""
    publish_args: list[str] = field(default_factory=lambda: ["dry_run=true"])
    """Overrides for pipeline.publish, quoted for Hydra: publish_args='["repo_id=me/smollm2-family"]'; by
    default a release folder only (dry_run=true)."""
    progress: bool = False
    """Progress bars in the stages (off: the family's log is read afterwards)."""

    def __post_init__(self):
        if self.report is not None and not self.report.endswith(".md"):
            raise ConfigError(f"report={self.report!r} must be a .md path, e.g. report=docs/results.md")
        if not self.sizes or any(n < 1 for n in self.sizes) or list(self.sizes) != sorted(set(self.sizes)):
            raise ConfigError(f"sizes={list(self.sizes)} must be distinct positive sizes, smallest first. "
                              "Fix: sizes=[4096,16384,65536]")
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ConfigError(f"steps has {bad}; the steps are {list(STEPS)}")
        for name in ("n_tokens", "test_tokens", "nproc", "checkpoint_every", "eval_tokens", "interpret_tokens",
                     "max_pages", "completeness_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for p in self.attribution_prompts:
            if set(p) != {"prompt", "target"}:
                raise ConfigError(f"attribution_prompts has {dict(p)}; each entry is {{prompt: ..., target: ...}}")
