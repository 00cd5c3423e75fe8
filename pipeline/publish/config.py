"""Configuration of the publishing stage (`python -m pipeline.publish`, conf/publish.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.errors import ConfigError
from pipeline.publish.neuronpedia import NeuronpediaConfig


@dataclass
class PublishConfig:
    checkpoints: list[str] = field(default_factory=lambda: [demo.SAE])
    """Exported SAEs (a training run's <out_dir>/sae), one per hook; each becomes a release sub-folder
    named after its hook (SAELens's sae_id), e.g. model.layers.15."""
    sae_ids: list[str] = field(default_factory=list)
    """The release sub-folder (SAELens's sae_id) of each checkpoint, same order, for releases of several
    SAEs on one hook (a family of sizes: [model.layers.15-4096, model.layers.15-16384]); empty: each
    SAE's hook."""
    eval_dirs: list[str] | None = None
    """The out_dir of `pipeline.evaluate` for each checkpoint (same order), holding its metrics.json
    and density_histogram.png; an empty entry: none for that checkpoint. Publish reads only the
    folders it is given: None is the embedded default's (demo.EVALUATE) when checkpoints is its
    default too, else none (and require_metrics refuses to publish without)."""
    dashboard_dirs: list[str] = field(default_factory=list)
    """The out_dir of `pipeline.interpret` for each checkpoint (same order), holding its dashboard
    (index.html, features/, ...), copied into the release as <sae_id>/dashboard/; an empty entry: no
    dashboard for that checkpoint. Empty: no dashboards (a release needs none)."""
    require_metrics: bool = True
    """Refuse to publish a checkpoint without evaluation metrics (a release without them is no release)."""
    out_dir: str = demo.RELEASE
    """The local release folder, rebuilt on every run (deterministically, so reruns upload nothing new)."""
    repo_id: str | None = None
    """Hugging Face Hub target, owner/name (None: no Hub upload)."""
    path_in_repo: str = ""
    """Sub-folder of the repo that holds the release (README.md and one folder per SAE)."""
    revision: str = "main"
    """Branch to commit to (created from main if missing)."""
    private: bool = False
    """Create the repo private (an existing repo keeps its visibility)."""
    endpoint: str | None = None
    """Hub URL; None: $HF_ENDPOINT or https://huggingface.co. The token comes from $HF_TOKEN or
    `hf auth login`, never from this config, and is never printed or logged."""
    target: str | None = None
    """Any fsspec URL to copy the release to as well (or instead), e.g. s3://bucket/releases/name."""
    storage_options: dict = field(default_factory=dict)
    """Passed to fsspec for target, e.g. {endpoint_url: ..., key: ..., secret: ...} for S3."""
    dry_run: bool = False
    """Write the release folder and list what would be uploaded; no network at all."""
    max_shard_size: str = "5GB"
    """Weights larger than this are split into feature slices, each a folder SAELens loads as an SAE
    over its features (docs/release-format.md), plus an index."""
    single_commit_size: str = "2GB"
    """Releases (the files that changed) up to this size go to the Hub in one commit; larger ones in
    several commits of at most commit_size each, the config, manifest and card in the last."""
    commit_size: str = "10GB"
    commit_message: str | None = None
    """Default: "Publish <sae ids> with pipeline"."""
    license: str = "apache-2.0"
    base_model: str | None = None
    """Hub id of the language model for the card metadata; default: the checkpoint's model id when it
    looks like one (owner/name)."""
    datasets: list[str] = field(default_factory=list)
    """Hub ids of the training data for the card metadata."""
    tags: list[str] = field(default_factory=list)
    """Extra card tags (sparse-autoencoder, saelens and the architectures are always there)."""
    title: str | None = None
    """Card title; default from the repo id."""
    context_size: int | None = None
    """SAELens's metadata.context_size (tokens per context the SAE was trained on). Unset: the one its
    store recorded at caching, which a different value here may not contradict."""
    neuronpedia: NeuronpediaConfig = field(default_factory=NeuronpediaConfig)
    progress: bool = True

    def __post_init__(self):
        from pipeline.publish.release import parse_size
        if not self.checkpoints:
            raise ConfigError(f"checkpoints is empty; name at least one exported SAE, e.g. checkpoints=[{demo.SAE}]")
        if self.eval_dirs is None:  # the embedded default's chain of folders (pipeline/demo.py), or none
            self.eval_dirs = [demo.EVALUATE] if list(self.checkpoints) == [demo.SAE] else []
        bad = [x for x in self.sae_ids if not x or x.startswith(".") or "/" in x or "\\" in x]
        if bad:
            raise ConfigError(f"sae_ids has {bad}: each is one folder name (no '/', not empty, not starting with '.')")
        if len(set(self.sae_ids)) != len(self.sae_ids):
            raise ConfigError(f"sae_ids={list(self.sae_ids)} repeats a name; each SAE needs its own folder")
        for name in ("sae_ids", "eval_dirs", "dashboard_dirs"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.checkpoints):
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries for {len(self.checkpoints)} "
                                  "checkpoints; give one per checkpoint (an empty entry for none), or none at all")
        if self.repo_id is not None:
            if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
                raise ConfigError(f"repo_id={self.repo_id!r} must be owner/name, e.g. my-org/smollm2-saes")
            # the Hub's own rule, checked here so that a dry run refuses what the upload would
            from huggingface_hub.utils import HFValidationError, validate_repo_id
            try:
                validate_repo_id(self.repo_id)
            except HFValidationError as e:
                raise ConfigError(f"repo_id={self.repo_id!r} is not a name the Hub accepts: {e} Fix: choose a name "
                                  "that follows this rule, e.g. repo_id=my-org/smollm2-saes") from None
        for name in ("max_shard_size", "single_commit_size", "commit_size"):
            if parse_size(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be positive")
        self.neuronpedia.check(len(self.checkpoints))
