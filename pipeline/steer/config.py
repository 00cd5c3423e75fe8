"""Configuration of the steering stage (`python -m pipeline.steer`, conf/steer.yaml)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline import demo
from pipeline.analysis.collect import FEATURES_FILE
from pipeline.analysis.config import InputConfig
from pipeline.errors import ConfigError

_CLAMP = re.compile(r"^\s*(-?\d+)\s*[:=]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(x?)\s*$")


@dataclass(frozen=True)
class Clamp:
    feature: int
    value: float
    relative: bool
    """True: value is a multiple of the feature's max activation (from the interpretation stage)."""

    @classmethod
    def parse(cls, text: str) -> "Clamp":
        m = _CLAMP.match(str(text))
        if not m:
            raise ConfigError(f"clamp {text!r} is not FEATURE:VALUE (absolute) or FEATURE:VALUEx (a multiple of the "
                              "feature's max activation). Fix: e.g. clamp=[\"123:10x\"] or clamp=[\"123:4.5\"]")
        return cls(int(m.group(1)), float(m.group(2)), m.group(3) == "x")


@dataclass
class SteerConfig:
    input: InputConfig = field(default_factory=InputConfig)
    """The dictionary, its model and hook (pipeline/analysis/config.py); steering reads no corpus."""
    prompt: str = "Tell me about a place you would like to visit."
    clamp: list[str] = field(default_factory=list)
    """Features to clamp at every position: "FEATURE:VALUE" (absolute activation) or "FEATURE:VALUEx"
    (VALUE times the feature's max activation; Scaling Monosemanticity uses -10x..10x). Only the
    clamped features' contributions change: x -> x + sum_i (v_i - f_i(x)) W_dec[i], the SAE error
    term is kept. Empty: the steered generation is the clean one."""
    features: str = f"{demo.INTERPRET}/{FEATURES_FILE}"
    """The interpretation stage's feature summary: max activations (for relative clamps) and
    densities (clamping a feature that never fired is refused)."""
    allow_dead: bool = False
    """Allow absolute clamps on features that never fired in the interpretation sample."""
    chat: bool = True
    """Wrap the prompt in the tokenizer's chat template when it has one (instruct models)."""
    max_new_tokens: int = 40
    temperature: float = 0.0
    """0: greedy decoding (clean and steered then differ only by the clamp); > 0: sampling."""
    seed: int = 0
    """Sampling seed, the same for the clean and the steered generation."""
    out_dir: str | None = demo.STEER
    """generations.json is written here (null: print only)."""
    width: int = 56
    """Column width of the side-by-side print."""

    def clamps(self) -> list[Clamp]:
        return [Clamp.parse(c) for c in self.clamp]

    def __post_init__(self):
        seen = [c.feature for c in self.clamps()]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"clamp={list(self.clamp)} names a feature twice; give one value per feature")
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be positive and temperature="
                              f"{self.temperature} >= 0")
