"""The activation store contract: key names, attribute names and dtype encoding, in one place.
docs/store-format.md describes the same layout for people; change both together."""

from __future__ import annotations

import numpy as np
import torch

FORMAT_NAME = "pipeline.activation-store"
# Version 1 throughout: additions that readers of either age handle keep it (docs/store-format.md,
# Versions), such as the modality array and chunk checksums (layout.checksum, a zarr codec that any
# zarr reader verifies; stores without it read as before, with a warning).
FORMAT_VERSION = 1

HEADER_ATTR = "pipeline"          # group attribute written when the store is created
COMMIT_ATTR = "pipeline_commit"   # group attribute written when the store is committed
TOKENS = "tokens"                 # int32 [n_tokens]: token id of each row
CONTEXT = "context"               # int32 [n_tokens]: global index of the row's context
POSITION = "position"             # int16 [n_tokens]: position of the row inside its context
MODALITY = "modality"             # int8 [n_tokens], optional: what the row's input position held (MODALITIES)
HOOKS_GROUP = "hooks"             # hooks/<hook name>/{acts,norm}
ACTS = "acts"                     # [n_tokens, d_model] in the storage dtype
NORM = "norm"                     # float32 [n_tokens]: L2 norm of each row, for outlier rules
SHARD_MARKERS = "_pipeline/shards"
COMMIT_MARKER = "_pipeline/COMMITTED.json"

# Values of the optional `modality` array (vision-language stores). A store without the array is
# all text. Added in version 1 without a version change: readers ignore arrays they do not know.
TEXT, IMAGE = 0, 1
MODALITIES = {TEXT: "text", IMAGE: "image"}

# Zarr has no bfloat16: its bits are stored as uint16 and `dtype` in the header says what they are.
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


# Residual-stream activations are near-incompressible floats (zstd saves ~7% on SmolLM2's layer 15
# in fp16) while decompression is most of a loader's CPU time: the default, blosc-lz4, stores such
# chunks raw at memcpy speed and still compresses the id/position arrays.
COMPRESSORS = ("blosc-lz4", "zstd", "none")


def compressors(name: str, checksum: bool = True) -> list:
    """The bytes-to-bytes codecs of every array: the compressor, then (layout.checksum) a CRC32C of
    the compressed bytes, which zarr verifies on every read. Without it a flipped byte in a raw or
    lz4 chunk decodes to wrong values without any error. A store whose header has no
    layout.checksum predates it and has none (docs/store-format.md)."""
    import zarr.codecs
    if name not in COMPRESSORS:
        from pipeline.errors import ConfigError
        raise ConfigError(f"store compressor {name!r} is not supported; use one of {list(COMPRESSORS)}")
    if name == "zstd":
        codecs = [zarr.codecs.ZstdCodec(level=1)]
    elif name == "blosc-lz4":
        codecs = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    else:
        codecs = []
    return codecs + [zarr.codecs.Crc32cCodec()] if checksum else codecs


def check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        from pipeline.errors import ConfigError
        raise ConfigError(f"store dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    return dtype


def hook_path(hook: str, leaf: str) -> str:
    return f"{HOOKS_GROUP}/{hook}/{leaf}"


def shard_marker(shard: int) -> str:
    return f"{SHARD_MARKERS}/{shard:06d}.json"


def encode(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the numpy array that the store keeps for `dtype`."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).numpy()
    return x.to(getattr(torch, dtype)).numpy()


def decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values back as a float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()
