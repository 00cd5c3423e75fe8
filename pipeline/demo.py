"""The embedded default's folders (`make demo`, every stage run with no arguments): each stage's
default output is the next stage's default input, so the chain is written down once, here.

    cache -> ACTIVATIONS -> train -> train_dir(architecture)/sae (SAE for topk) -> evaluate -> EVALUATE,
    interpret -> INTERPRET (features.json, read by steer and audit), steer -> STEER, audit -> AUDIT,
    publish -> RELEASE
"""

from pipeline.heldout import EXPORT_DIR

ROOT = "runs/demo"
ACTIVATIONS = f"{ROOT}/activations"
EVALUATE = f"{ROOT}/evaluate"
INTERPRET = f"{ROOT}/interpret"
STEER = f"{ROOT}/steer"
AUDIT = f"{ROOT}/audit"
RELEASE = f"{ROOT}/release"


def train_dir(architecture: str) -> str:
    """The trainer's default out_dir for an architecture (its export is <out_dir>/sae)."""
    return f"{ROOT}/train/{architecture}"


SAE = f"{train_dir('topk')}/{EXPORT_DIR}"
"""The default dictionary every analysis stage reads: the export of the default (topk) training run."""
