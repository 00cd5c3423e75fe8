"""Steering: generate with SAE features clamped at every position, keeping the SAE error term."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from torch import Tensor

from pipeline.analysis.dictionary import Dictionary
from pipeline.analysis.prompts import prompt_ids
from pipeline.analysis.steering import clamp_fn
from pipeline.errors import ConfigError
from pipeline.models import LoadedModel, replace_output
from pipeline.steer.config import Clamp, SteerConfig

GENERATIONS_FILE = "generations.json"


def resolve_clamps(d: Dictionary, clamps: list[Clamp], features_file: str | None, allow_dead: bool = False
                   ) -> dict[int, float]:
    """Absolute clamp values; relative clamps are multiplied by the feature's max activation from
    the interpretation stage's features.json. Dead features (never fired there) are refused."""
    stats = None
    if features_file and Path(features_file).exists():
        doc = json.loads(Path(features_file).read_text())
        if doc.get("n_features") not in (None, d.n_features):
            raise ConfigError(f"{features_file} describes {doc['n_features']} features but the SAE at {d.path!r} has "
                              f"{d.n_features}. Fix: point features= at the interpretation output of this SAE")
        stats = {f["index"]: f for f in doc["features"]}
    out = {}
    for c in clamps:
        d.check_feature(c.feature, "clamped feature")
        s = stats.get(c.feature) if stats is not None else None
        if stats is None:
            if c.relative:
                raise ConfigError(f"clamp {c.feature}:{c.value:g}x is relative to the feature's max activation, "
                                  f"which comes from {features_file!r}, which does not exist. Fix: run python -m "
                                  "pipeline.interpret first (or set features=...), or give an absolute value "
                                  f"({c.feature}:VALUE)")
            print(f"warning: no {features_file!r}: cannot check whether feature {c.feature} is alive", flush=True)
            out[c.feature] = c.value
            continue
        dead = s is None or not s.get("max_act")
        if dead and (c.relative or not allow_dead):
            raise ConfigError(
                f"feature {c.feature} is dead: it never fired on the {doc.get('n_tokens', '?')} tokens of "
                f"{features_file}, so it has no max activation and no known meaning. Fix: clamp a live feature "
                "(the dashboard's index lists them by density)" +
                ("" if c.relative else ", or set allow_dead=true to clamp it to an absolute value anyway"))
        out[c.feature] = c.value * s["max_act"] if c.relative else c.value
    return out


@torch.no_grad()
def generate(loaded: LoadedModel, d: Dictionary, ids: Tensor, values: dict[int, float], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> str:
    """The continuation of ids with `values` clamped (empty: the clean model)."""
    tok = loaded.tokenizer
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
              attention_mask=torch.ones_like(ids))
    if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    if values:
        with replace_output(loaded.model, d.hook, clamp_fn(d, values)):
            out = loaded.model.generate(ids, **kw)
    else:
        out = loaded.model.generate(ids, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(cfg: SteerConfig) -> dict:
    loaded, d = Dictionary.from_input(cfg.input)
    values = resolve_clamps(d, cfg.clamps(), cfg.features, cfg.allow_dead)
    ids = prompt_ids(loaded, cfg.prompt, cfg.chat)
    clean = generate(loaded, d, ids, {}, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    steered = generate(loaded, d, ids, values, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    result = {"sae": d.path, "hook": d.hook, "prompt": cfg.prompt, "clamps": [
        {"feature": c.feature, "given": f"{c.value:g}{'x' if c.relative else ''}", "value": values[c.feature]}
        for c in cfg.clamps()], "temperature": cfg.temperature, "clean": clean, "steered": steered}
    print(side_by_side(result, cfg.width), flush=True)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / GENERATIONS_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {out / GENERATIONS_FILE}", flush=True)
    return result


def side_by_side(result: dict, width: int = 56) -> str:
    clamps = ", ".join(f"feature {c['feature']} = {c['given']} ({c['value']:.3g})" for c in result["clamps"]) or "none"
    left = _wrap(result["clean"], width)
    right = _wrap(result["steered"], width)
    rows = [f"prompt: {result['prompt']}", f"clamped: {clamps}", "",
            f"{'clean':<{width}} | steered", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for para in text.split("\n"):
        lines.extend(textwrap.wrap(para, width) or [""])
    return lines
