"""The lower layer of the analysis stages (evaluate, interpret, steer, audit): what they share, so
that no stage imports another.

    dictionary.py  Dictionary: an export or a release attached to a model's hook (encode, decode)
    release.py     the release folder contract: names, reader, hf:// download
    config.py      InputConfig: the `input` section of every analysis stage's config
    batches.py     held-out text in context batches; the massive-activation rule; token text
    metrics.py     reconstruction and downstream-loss metrics (evaluate; the audit's cross-modal check)
    collect.py     top-activating and sampled examples per feature; features.json's names
    prompts.py     prompts as token ids (plain or chat) and their latents
    steering.py    the clamp hook that keeps the SAE error term
    logits.py      the direct logit effect of decoder directions
    html.py        HTML page helpers and the dashboard folder's contract
"""

from pipeline.analysis.config import InputConfig
from pipeline.analysis.dictionary import Dictionary

__all__ = ["Dictionary", "InputConfig"]
