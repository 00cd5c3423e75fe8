"""A sharded release's SAE in SAELens: its shard folders, each a SAELens SAE over a feature range,
used as one SAE (docs/release-format.md). Needs only torch and SAELens, so that it runs where SAELens
is installed (`pip install --no-deps` of this package is enough):

    from pipeline.saelens_shards import ShardedSAE
    sae = ShardedSAE.from_pretrained("my-org/saes", "model.layers.15")   # or .load_from_disk(folder)
    x_hat = sae.decode(sae.encode(x))

Each shard alone is a valid SAE (`SAE.from_pretrained(repo, "<sae_id>/shards/00001-of-00005")`):
its latents are the whole SAE's latents over its features, exactly for elementwise activations
(standard, jumprelu); a topk shard keeps its own top k. The decoder bias is the whole SAE's, repeated
in every shard, so that x_hat = b_dec + sum_i (shard_i.decode(f_i) - b_dec).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sae_lens import SAE

INDEX = "sae_weights.safetensors.index.json"


class ShardedSAE:
    """The SAELens SAEs of a sharded release's shard folders, in feature order, used as one SAE."""

    def __init__(self, shards: list[SAE], index: dict):
        self.shards, self.index = shards, index
        self.k = index.get("k")  # topk: the whole SAE keeps the top k of all shards' codes
        self.b_dec = shards[0].b_dec

    @classmethod
    def load_from_disk(cls, folder, device: str = "cpu") -> ShardedSAE:
        index = json.loads((Path(folder) / INDEX).read_text())
        return cls([SAE.load_from_disk(Path(folder) / s["folder"], device=device) for s in index["shards"]], index)

    @classmethod
    def from_pretrained(cls, repo_id: str, sae_id: str, device: str = "cpu") -> ShardedSAE:
        from huggingface_hub import hf_hub_download
        index = json.loads(Path(hf_hub_download(repo_id, f"{sae_id}/{INDEX}")).read_text())
        return cls([SAE.from_pretrained(repo_id, f"{sae_id}/{s['folder']}", device=device)
                    for s in index["shards"]], index)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The whole SAE's latents [..., d_sae]."""
        f = torch.cat([s.encode(x) for s in self.shards], dim=-1)
        if self.k is None:
            return f
        # each shard's code holds its top k (ReLU'd): the whole SAE's top k is among them
        values, indices = f.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(f).scatter_(-1, indices, values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        bounds = [s["features"] for s in self.index["shards"]]
        return self.b_dec + sum(s.decode(f[..., a:b]) - s.b_dec for s, (a, b) in zip(self.shards, bounds))
