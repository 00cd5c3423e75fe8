"""Prompts as the model sees them: token ids (plain, after BOS, or in the chat template) and the
latents of every token of a prompt."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.analysis.dictionary import Dictionary
from pipeline.models import ActivationCapture, LoadedModel


def prompt_activations(d: Dictionary, loaded: LoadedModel, text: str) -> tuple[list[int], torch.Tensor]:
    """Token ids of text (BOS first, as in the training contexts) and their latents [T, n_features]."""
    tok = loaded.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = ([bos] if bos is not None else []) + list(ids)
    x = ActivationCapture(loaded, [d.hook])(torch.tensor([ids]))[d.hook][0]
    return ids, d.encode(x)


def prompt_ids(loaded: LoadedModel, prompt: str, chat: bool) -> Tensor:
    """[1, T] token ids of a prompt, in the chat template when `chat` and the tokenizer has one, else
    plain text after BOS; on the model's device."""
    tok = loaded.tokenizer
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
        if tok.bos_token_id is not None and (ids.shape[1] == 0 or ids[0, 0] != tok.bos_token_id):
            ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    return ids.to(loaded.device)
