"""Inputs of vision-language models: image+text pairs from a JSONL manifest, through the model's own
processor, packed into fixed-length contexts that never cut an image's block of tokens.

    {"image": "photos/bridge.jpg", "text": "The Golden Gate Bridge at dusk."}   # one line per pair

Image paths are relative to the manifest's folder. Each pair becomes the processor's prompt (the
image token first unless the text places it) followed by EOS; pairs are packed into contexts of
`context_size` tokens that start with BOS, as text is (pipeline.data.pack_contexts). Text may run
on into the next context; an image's block (the processor's <fake_token_around_image> ...
<image> x N ... markup) may not: if it does not fit in what is left of a context, the rest is
filled with EOS and the block starts the next context. The last context is filled with EOS too,
so every pair is cached. Supported: processors that return pixel_values [1, tiles, 3, H, W]
(Idefics3, SmolVLM); the rows whose input was an image embedding are marked F.IMAGE in the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.models import LoadedModel
from pipeline.store import format as F


@dataclass
class ManifestItem:
    image: Path
    text: str
    line: int


@dataclass
class VisionContext:
    """One context: token ids and the tiles of the images whose blocks it holds, in order."""

    ids: np.ndarray                        # [context_size] int64
    pixel_values: Tensor | None            # [tiles, 3, H, W], or None without images
    pixel_attention_mask: Tensor | None    # [tiles, H, W] (1: a real pixel), or None


def read_manifest(path: str | Path) -> list[ManifestItem]:
    """Read and check a manifest: every line an object with a string `text` and an `image` file
    that exists. Errors name the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest={str(path)!r} does not exist. Fix: give a JSONL file with one "
                          '{"image": path, "text": ...} object per line')
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"manifest {str(path)!r} line {n} is not JSON ({e}). Fix: one "
                              '{"image": path, "text": ...} object per line') from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("text"), str):
            raise ConfigError(f"manifest {str(path)!r} line {n} must be an object with a string `image` (a path) "
                              f"and a string `text`; got {line.strip()[:200]!r}")
        image = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
        if not image.is_file():
            raise ConfigError(f"manifest {str(path)!r} line {n}: image {str(image)!r} does not exist. Fix: "
                              "paths are relative to the manifest's folder")
        items.append(ManifestItem(image, row["text"], n))
    if not items:
        raise ConfigError(f"manifest {str(path)!r} holds no pairs. Fix: add lines of "
                          '{"image": path, "text": ...}')
    return items


def manifest_digest(path: str | Path, items: list[ManifestItem]) -> str:
    """Hash of the manifest and of every image file: what decides a vision store's inputs."""
    h = hashlib.sha256(Path(path).read_bytes())
    for it in items:
        h.update(it.image.read_bytes())
    return h.hexdigest()[:16]


def image_token_id(loaded: LoadedModel) -> int | None:
    """The token id whose positions the model fills with image embeddings (None: a text model)."""
    if not loaded.is_vision_language:
        return None
    tid = getattr(loaded.model.config, "image_token_id", None)
    if tid is None:
        tid = getattr(loaded.processor, "image_token_id", None)
    if tid is None:
        raise ConfigError(f"cannot tell which token of {loaded.model_id!r} stands for image embeddings "
                          "(neither config.image_token_id nor processor.image_token_id)")
    return int(tid)


def encode_pair(loaded: LoadedModel, image, text: str, image_splitting: bool = False
                ) -> tuple[list[int], Tensor, Tensor | None]:
    """One image (a path or a PIL image) and its text through the processor: (token ids without BOS,
    pixel_values [tiles, 3, H, W], pixel_attention_mask [tiles, H, W] or None)."""
    from PIL import Image
    proc = loaded.processor
    if proc is None:
        raise ConfigError(f"{loaded.model_id!r} is a text model; images need a vision-language model "
                          "(e.g. model.name=HuggingFaceTB/SmolVLM-256M-Instruct)")
    token = proc.image_token
    prompt = text if token in text else token + text
    if prompt.count(token) != 1:
        raise ConfigError(f"text {text[:100]!r} places {prompt.count(token)} image tokens {token!r}; a pair has one image")
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            image = im.convert("RGB")
    kw = {}
    if hasattr(proc.image_processor, "do_image_splitting"):
        kw["do_image_splitting"] = image_splitting
    out = proc(text=[prompt], images=[[image]], return_tensors="pt", add_special_tokens=False, **kw)
    pv = out["pixel_values"]
    if pv.ndim != 5:
        raise ConfigError(f"the processor of {loaded.model_id!r} returns pixel_values of shape {tuple(pv.shape)}; "
                          "image caching supports processors that return [batch, tiles, 3, H, W] (Idefics3, SmolVLM)")
    mask = out.get("pixel_attention_mask")
    return out["input_ids"][0].tolist(), pv[0], (mask[0] if mask is not None else None)


def image_block(loaded: LoadedModel, ids: list[int]) -> tuple[int, int]:
    """[lo, hi) of the image's markup in ids: from the first to the last image or wrapper token."""
    marks = {image_token_id(loaded)}
    fake = getattr(loaded.processor, "fake_image_token_id", None)
    if isinstance(fake, int) and fake != getattr(loaded.tokenizer, "unk_token_id", None):
        marks.add(fake)
    at = [i for i, t in enumerate(ids) if t in marks]
    if not at:
        raise ConfigError(f"the processor of {loaded.model_id!r} inserted no image token")
    return at[0], at[-1] + 1


def pack_vision_contexts(items: list[ManifestItem], loaded: LoadedModel, context_size: int,
                         image_splitting: bool = False) -> Iterator[VisionContext]:
    """The manifest's pairs as contexts of context_size tokens (BOS first), see the module doc."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else bos
    body = context_size - 1
    buf: list[int] = []
    tiles: list[tuple[Tensor, Tensor | None]] = []

    def flush() -> VisionContext:
        ids = np.array([bos] + buf + [eos] * (body - len(buf)), dtype=np.int64)
        pv = torch.cat([t[0] for t in tiles]) if tiles else None
        pm = torch.cat([t[1] for t in tiles]) if tiles and all(t[1] is not None for t in tiles) else None
        buf.clear()
        tiles.clear()
        return VisionContext(ids, pv, pm)

    for it in items:
        ids, pv, pm = encode_pair(loaded, it.image, it.text, image_splitting)
        ids = ids + [eos]
        lo, hi = image_block(loaded, ids)
        if hi - lo > body:
            raise ConfigError(f"the image of manifest line {it.line} ({it.image}) takes {hi - lo} tokens, more than a "
                              f"context of context_size={context_size} holds after BOS. Fix: raise context_size, or "
                              "set image_splitting=false")
        for piece, image in ((ids[:lo], None), (ids[lo:hi], (pv, pm)), (ids[hi:], None)):
            if image is not None:
                if len(piece) > body - len(buf):
                    yield flush()
                buf.extend(piece)
                tiles.append(image)
                if len(buf) == body:
                    yield flush()
                continue
            while piece:
                take = piece[:body - len(buf)]
                buf.extend(take)
                piece = piece[len(take):]
                if len(buf) == body:
                    yield flush()
    if buf:
        yield flush()


def batch_inputs(contexts: list) -> tuple[Tensor, dict]:
    """Contexts (token-id arrays, or VisionContexts) -> (input_ids [n, T], further model inputs).
    Images are padded as the processor pads a batch: missing tiles and pixels are zeros (the
    model drops all-zero tiles) with pixel_attention_mask 0."""
    if not contexts or not isinstance(contexts[0], VisionContext):
        return torch.from_numpy(np.stack(contexts)), {}
    ids = torch.from_numpy(np.stack([c.ids for c in contexts]))
    withpix = [c for c in contexts if c.pixel_values is not None]
    if not withpix:
        return ids, {}
    n_tiles = max(c.pixel_values.shape[0] for c in withpix)
    _, ch, h, w = withpix[0].pixel_values.shape
    h, w = max(c.pixel_values.shape[2] for c in withpix), max(c.pixel_values.shape[3] for c in withpix)
    pv = torch.zeros(len(contexts), n_tiles, ch, h, w, dtype=withpix[0].pixel_values.dtype)
    pm = torch.zeros(len(contexts), n_tiles, h, w, dtype=torch.bool)
    for i, c in enumerate(contexts):
        if c.pixel_values is None:
            continue
        t, _, hh, ww = c.pixel_values.shape
        pv[i, :t, :, :hh, :ww] = c.pixel_values
        pm[i, :t, :hh, :ww] = c.pixel_attention_mask.bool() if c.pixel_attention_mask is not None else True
    return ids, {"pixel_values": pv, "pixel_attention_mask": pm}


def modality_of(ids: Tensor, image_id: int) -> Tensor:
    """int8 per position: F.IMAGE where the model put an image embedding, else F.TEXT."""
    return torch.where(ids == image_id, F.IMAGE, F.TEXT).to(torch.int8)
