"""SAELens's cached-activation datasets and our stores, converted both ways bit for bit.

What SAELens 6.x's CacheActivationsRunner writes (sae_lens/cache_activations_runner.py, 6.54.12) and
its ActivationsStore reads back (`cached_activations_path`): a Hugging Face `datasets` Dataset saved
with `save_to_disk` (dataset_info.json, state.json, data-*.arrow), one row per context:
    <hook name>   Array2D(shape=(context rows, d_in), dtype="float32" or "float16") (TransformerLens name)
    token_ids     Sequence(Value("int32"), length=context rows)
The context rows are what SAELens's seqpos_slice kept of each context; the dataset records neither
that slice nor the model. The runner's `shuffle` shuffles the Dataset it returns and pushes to the Hub,
not the folder, which is in caching order; a dataset's row order is kept as it is, either way.

Our store (docs/store-format.md) holds the same values one token per row. Exporting writes one
column per hook (named by the header's TransformerLens name where it has one), token_ids, a `modality`
column for vision-language stores (SAELens's reader ignores columns it does not ask for), and
SIDECAR, our header, so that importing the dataset back restores what the dataset format cannot say.
bfloat16 stores export as float32 columns (exact; `datasets` has no bfloat16) and import back as
bfloat16 through the sidecar.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError, InputNotFoundError, UserError
from pipeline.store import ActivationStore, ActivationStoreWriter, StoreLayout, commit

TOKEN_IDS = "token_ids"
MODALITY = "modality"
SIDECAR = "pipeline_store.json"
SIDECAR_FORMAT = "pipeline.saelens-exchange"
COLUMN_DTYPES = ("float32", "float16")
"""The activation dtypes SAELens's runner can write (its bfloat16 fails in pyarrow)."""


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise UserError("SAELens datasets need the `datasets` package. Fix: pip install 'datasets>=3.0' "
                        "(or the package's [hf] extra)") from exc
    return datasets


# --- our store -> SAELens ---------------------------------------------------------------------------

def column_names(meta: dict) -> dict[str, str]:
    """Dataset column -> our hook: the hook's TransformerLens name where the header has one (SAELens
    names its columns so), else the hook's own name."""
    points = meta.get("hook_points") or {}
    out = {}
    for hook in meta["layout"]["hooks"]:
        tl = (points.get(hook) or {}).get("transformer_lens")
        name = tl if isinstance(tl, str) and tl.startswith("blocks.") else hook
        out[hook if name in out else name] = hook
    return out


def export_store(url: str, storage_options: dict | None, path: str) -> int:
    """Write the store at `url` as a SAELens cached-activation dataset at `path` (which must not
    hold anything yet); returns the number of contexts written."""
    ds_lib = _datasets()
    store = ActivationStore.open(url, storage_options)
    dest = Path(path)
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{path!r} is not empty; the export writes a new dataset folder. Fix: choose another "
                          "dataset path or delete that folder")
    rows = store.meta["layout"]["rows_per_context"]
    dtype = store.dtype if store.dtype in COLUMN_DTYPES else "float32"
    columns = column_names(store.meta)
    features = {c: ds_lib.Array2D(shape=(rows, store.d_model), dtype=dtype) for c in columns}
    features[TOKEN_IDS] = ds_lib.Sequence(ds_lib.Value("int32"), length=rows)
    if store.has_modality:
        features[MODALITY] = ds_lib.Sequence(ds_lib.Value("int8"), length=rows)

    def contexts():
        for chunk in range(store.n_chunks):  # whole contexts per chunk: one read of each array
            span = store.chunk_span(chunk)
            n = len(span) // rows
            block = {c: store.acts(span.start, span.stop, hook).to(getattr(torch, dtype)).numpy()
                     .reshape(n, rows, store.d_model) for c, hook in columns.items()}
            block[TOKEN_IDS] = store.tokens(span.start, span.stop).reshape(n, rows)
            if store.has_modality:
                block[MODALITY] = store.modality(span.start, span.stop).reshape(n, rows)
            for i in range(n):
                yield {k: v[i] for k, v in block.items()}

    dest.mkdir(parents=True, exist_ok=True)
    # from_generator writes arrow files to its cache, save_to_disk copies them into SAELens's layout;
    # a fresh cache beside the destination, so that no earlier export's cache is reused
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export-cache-") as cache:
        ds = ds_lib.Dataset.from_generator(contexts, features=ds_lib.Features(features), cache_dir=cache)
        ds.save_to_disk(str(dest))
    sidecar = {"format": SIDECAR_FORMAT, "version": 1, "store": store.meta, "columns": columns,
               "n_contexts": store.n_contexts,
               # what SAELens's ActivationsStore needs to read it (context_size is what it checks the
               # column shape against: the rows kept of each context, positions drop_positions...)
               "sae_lens": {"cached_activations_path": str(dest), "d_in": store.d_model, "context_size": rows,
                            "hook_names": list(columns), "dtype": dtype,
                            "seqpos_slice": [store.meta.get("drop_positions", 0), None]}}
    (dest / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return len(ds)


def arrow_numpy(column) -> np.ndarray:
    """A dataset column (pyarrow) as numpy in its own dtype, [contexts, ...]: Array2D columns
    through datasets' own conversion, fixed-length sequences (token_ids) flattened and reshaped."""
    import pyarrow as pa
    a = column.combine_chunks()
    if pa.types.is_fixed_size_list(a.type):
        return a.flatten().to_numpy().reshape(len(a), a.type.list_size)
    return a.to_numpy(zero_copy_only=False)


# --- SAELens -> our store ---------------------------------------------------------------------------

HEADER_FIELDS = ("model", "tokenizer", "data", "hook_points", "hook_modules", "context_size", "drop_positions",
                 "modality")
"""What an import takes from the sidecar of a dataset we exported: what the dataset format cannot say."""


def _columns(ds, path: str) -> tuple[list[str], int, int, str]:
    """The hook columns of a SAELens dataset and their (rows per context, d_in, dtype)."""
    datasets = _datasets()
    if TOKEN_IDS not in ds.features:
        raise ConfigError(f"the dataset at {path!r} has no {TOKEN_IDS!r} column (columns: {ds.column_names}); "
                          "a store needs the token of every row. Fix: cache it with a SAELens version that "
                          "writes token_ids (6.x does)")
    hooks = [c for c in ds.column_names if c not in (TOKEN_IDS, MODALITY)]
    bad = [c for c in hooks if not isinstance(ds.features[c], datasets.Array2D)]
    shapes = {tuple(ds.features[c].shape) for c in hooks if c not in bad}
    dtypes = {ds.features[c].dtype for c in hooks if c not in bad}
    if not hooks or bad or len(shapes) != 1 or len(dtypes) != 1 or not dtypes <= set(COLUMN_DTYPES):
        raise ConfigError(f"the dataset at {path!r} is not a SAELens cached-activation dataset: its columns "
                          f"{ {c: str(ds.features[c]) for c in ds.column_names} } should be {TOKEN_IDS!r} and hook "
                          f"columns, each Array2D of one shape and dtype (one of {list(COLUMN_DTYPES)})")
    (rows, d_in), (dtype,) = shapes.pop(), dtypes
    return hooks, rows, d_in, dtype


def import_dataset(path: str, store, *, model: str | None, first_position: int, outlier_factor: float) -> dict:
    """Write the SAELens dataset at `path` into a store (`store`: StoreConfig-like: url, storage_options,
    dtype (None: the dataset's), chunk_contexts, shard_contexts, compressor, checksum, overwrite);
    returns the commit record. Resumes like the cache stage: shards already written are kept."""
    datasets = _datasets()
    if not (Path(path) / "state.json").is_file():
        raise InputNotFoundError(f"no dataset saved with save_to_disk at {path!r} (no state.json). Fix: point "
                                 "dataset= at the folder SAELens's CacheActivationsRunner wrote")
    ds = datasets.load_from_disk(path)
    columns, rows, d_in, column_dtype = _columns(ds, path)
    side_file = Path(path) / SIDECAR
    side = json.loads(side_file.read_text()) if side_file.is_file() else {}
    origin = side.get("store") or {}
    hooks = [side.get("columns", {}).get(c, c) for c in columns]
    dtype = store.dtype or origin.get("dtype") or column_dtype
    modality = MODALITY in ds.features
    layout = StoreLayout(tuple(hooks), d_in, dtype, len(ds), rows, store.shard_contexts, store.chunk_contexts,
                         store.compressor, modality=modality, checksum=store.checksum)
    drop = origin.get("drop_positions", first_position)
    desc = {"source": {"format": "sae_lens.cached_activations", "path": str(Path(path).resolve()),
                       "fingerprint": ds._fingerprint, "columns": dict(zip(columns, hooks))},
            "first_position": drop, "model": model, "layout": asdict(layout)}
    header = {"fingerprint": hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16],
              "config": desc, "d_model": d_in, "hooks": hooks, "hook_modules": [None] * len(hooks), "dtype": dtype,
              "context_size": drop + rows, "drop_positions": drop,
              "model": {"id": model, "revision": None, "dtype": None, "architecture": None},
              "hook_points": {h: {"module": None, "transformer_lens": c, "meaning": "a SAELens dataset's column"}
                              for c, h in zip(columns, hooks)},
              "tokenizer": {"name": model, "bos_token_id": None, "eos_token_id": None, "vocab_size": None},
              "data": {"source": "sae_lens", "path": str(Path(path).resolve())},
              **{k: origin[k] for k in HEADER_FIELDS if k in origin},
              "imported_from": {"format": "sae_lens.cached_activations", "path": str(Path(path).resolve()),
                                "store_fingerprint": origin.get("fingerprint")}}
    writer = ActivationStoreWriter(store.url, layout, header, storage_options=store.storage_options,
                                   overwrite=store.overwrite, outlier_factor=outlier_factor)
    ds = ds.with_format("arrow")  # numpy would widen float16 to float32
    done = writer.finished_shards()
    try:
        for k in (k for k in range(layout.n_shards) if k not in done):
            span = layout.shard_contexts_range(k)
            part = {c: arrow_numpy(col) for c, col in zip(ds.column_names, ds[span.start:span.stop].columns)}
            n = len(span)
            writer.begin_shard(k)
            writer.append({h: torch.from_numpy(np.array(part[c])).reshape(n * rows, d_in)
                           for c, h in zip(columns, hooks)},
                          torch.from_numpy(part[TOKEN_IDS].reshape(-1).astype(np.int32)),
                          torch.arange(span.start, span.stop, dtype=torch.int32).repeat_interleave(rows),
                          (drop + torch.arange(rows, dtype=torch.int16)).repeat(n),
                          torch.from_numpy(part[MODALITY].reshape(-1).astype(np.int8)) if modality else None)
            writer.end_shard(n)
    finally:
        writer.close()
    return commit(writer)
