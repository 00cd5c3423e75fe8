"""Configuration of the caching stage."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline import demo
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig
from pipeline.store.format import check_dtype


@dataclass
class StoreConfig:
    url: str = demo.ACTIVATIONS
    """Any fsspec URL: a path, file://, memory://, s3://bucket/prefix, ..."""
    storage_options: dict = field(default_factory=dict)
    """Passed to fsspec, e.g. {endpoint_url: ..., key: ..., secret: ...} for S3."""
    dtype: str = "float16"
    """float32, float16 or bfloat16 (stored as uint16 bits)."""
    chunk_contexts: int = 32
    """Contexts per chunk: 32 x 127 rows x 576 x 2 bytes is ~4.7 MB, a good object-storage size."""
    shard_contexts: int = 256
    """Contexts per shard, the unit of parallel work and of resumption (a multiple of chunk_contexts)."""
    compressor: str = "blosc-lz4"
    """blosc-lz4 (stores incompressible activation chunks raw, fast), zstd (~7% smaller, slower to read) or none."""
    checksum: bool = True
    """End every chunk with a CRC32C, verified on every read, so that a corrupt chunk raises an error
    naming it instead of being read as wrong values. false: to resume a store written before
    checksums existed (the store has no layout.checksum), or to measure what they cost."""
    overwrite: bool = False
    """Replace a store written with a different configuration (never needed to resume)."""

    def __post_init__(self):
        check_dtype(self.dtype)


@dataclass
class WorkerConfig:
    """Which shards this process writes: shard k belongs to worker k % count. Unset values come from
    SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, then RANK/WORLD_SIZE (torchrun, accelerate), else 0/1."""

    index: int | None = None
    count: int | None = None

    def resolve(self) -> tuple[int, int]:
        env = os.environ
        if self.index is not None or self.count is not None:
            index, count = self.index or 0, self.count or 1
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            index, count = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        if not 0 <= index < count:
            raise ConfigError(f"worker index {index} is outside 0..{count - 1}")
        return index, count


@dataclass
class CacheConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    hooks: list[str] = field(default_factory=lambda: ["model.layers.15"])
    """Module paths (or `layers.N`) whose outputs are cached; the model stops after the deepest."""
    context_size: int = 128
    n_tokens: int = 100_000
    """Rows to cache per hook (tokens after dropping positions); fewer if the data runs out."""
    drop_positions: int = 1
    """Leading positions of each context not stored: 1 drops BOS, whose activation is an outlier."""
    batch_size: int = 8
    """Contexts per forward pass."""
    outlier_factor: float = 8.0
    """Rows with norm above this multiple of the median are counted but kept out of the statistics."""
    commit: bool = True
    """Commit the store when the last shard is in (any worker may; the commit is idempotent)."""
    commit_only: bool = False
    """Write nothing, only commit (the final task of a SLURM array)."""
    progress: bool = True
    manifest: str | None = None
    """Vision-language models: a JSONL file of {"image": path, "text": ...} pairs (paths relative to
    the file), cached instead of `data`. Unset: the text of `data`, every row marked text. With a
    vision-language model the store marks each row text or image (docs/store-format.md)."""
    image_splitting: bool = False
    """manifest only, Idefics3/SmolVLM processors: false gives each image one tile (SmolVLM-256M: 64
    image tokens), true the processor's tiling of large images (up to 4x4 tiles plus a global one)."""

    def __post_init__(self):
        if not self.hooks:
            raise ConfigError("hooks is empty; name at least one, e.g. hooks=[model.layers.15]")
        if not 0 <= self.drop_positions < self.context_size:
            raise ConfigError(f"drop_positions={self.drop_positions} must be in [0, context_size={self.context_size})")
        if self.n_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"n_tokens={self.n_tokens} and batch_size={self.batch_size} must be positive")
