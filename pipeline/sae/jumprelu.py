"""JumpReLU SAE: Rajamanoharan et al. (2024), as trained for Gemma Scope (Lieberum et al., 2024).

    f     = z * H(z - theta),  z = W_enc x + b_enc,  theta = exp(log_threshold) per latent
    x_hat = W_dec^T f + b_dec
    loss  = ||x - x_hat||^2 + lambda * ||f||_0

H has no useful derivative, so theta learns through straight-through estimators: a rectangle
kernel K of width epsilon (`bandwidth`) around the threshold gives
    d/dtheta JumpReLU(z) = -(theta / eps) K((z - theta) / eps),
    d/dtheta H(z - theta) = -(1 / eps) K((z - theta) / eps).
A latent whose pre-activation never comes near its threshold gets no gradient at all, so dead
latents get the pre-activation loss of Anthropic's January 2025 update instead (the `aux` term):
    aux = aux_coef * mean over tokens of sum over dead latents i of relu(theta_i - z_i) / n_features,
which raises their pre-activations (and lowers their thresholds) until they fire again.
Decoder rows have unit norm; W_enc = W_dec and b_enc = -W_enc b_dec at init, theta = initial_threshold,
then in the trainer each latent's quantile on the first batch (init_from_data).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder, SparseCode, register
from pipeline.sae.tiled import tiled_sum, tiles

MIN_THRESHOLD = 1e-3
"""Floor of a data-initialised threshold (a latent whose pre-activation is rarely positive)."""


def _kernel(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return ((z - theta).abs() < eps / 2).to(z.dtype) / eps


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        g_theta = -(theta * _kernel(z, theta, ctx.eps) * g).sum(0)
        return g * (z > theta), g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        return None, -(_kernel(z, theta, ctx.eps) * g).sum(0), None


def initial_threshold(cfg: SAEConfig, mean_sq_norm: float = 0.0) -> float:
    """sae.threshold_init, or where a normal pre-activation fires on k of n_features tokens: a unit-norm
    row on the centred input (E||x||^2 = d_model, the mean's squared norm mean_sq_norm) has a variance of
    (d_model - mean_sq_norm) / d_model on average over directions."""
    if cfg.threshold_init is not None:
        return cfg.threshold_init
    sigma = math.sqrt(max(1 - mean_sq_norm / cfg.d_model, 1e-4))
    quantile = float(torch.special.ndtri(torch.tensor(1 - cfg.k / cfg.n_features, dtype=torch.float64)))
    return max(sigma * quantile, MIN_THRESHOLD)  # k >= n_features / 2 puts the quantile at or below 0


@register
class JumpReLU(SparseAutoencoder):
    architecture = "jumprelu"
    feature_tensors = SparseAutoencoder.feature_tensors + ("log_threshold",)
    saelens_architecture = "jumprelu"
    recipe_lr_scale = 0.3
    """At topk's rate most latents die within ~30 steps (a pre-activation moves ~lr * sum_j |x_j| per
    step and falls below its threshold for good); at 0.3x it, with the thresholds at 30x
    (threshold_lr_scale) and the pre-activation loss at 8 (conf/sae/jumprelu.yaml): held-out FVU
    0.185, L0 38, 1.3% silent at 4,096 latents x 800k tokens (BENCHMARKS.md "jumprelu")."""

    @classmethod
    def saelens_state(cls, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """SAELens's threshold is theta itself; the extras keep log_threshold bit for bit."""
        out, extras = super().saelens_state(state)
        out["threshold"] = state["log_threshold"].exp()
        extras["log_threshold"] = state["log_threshold"].contiguous()
        return out, extras

    @classmethod
    def planned_parameters(cls, d: int, n: int) -> list[int]:
        return super().planned_parameters(d, n) + [n]  # log_threshold

    @classmethod
    def planned_transients(cls, b: int, n: int, d: int, k: int, tile: int, w: int, auxk: bool) -> tuple[int, int]:
        """Untiled, autograd keeps the [b, n] pre-activations, code and scaled code, and backward
        their gradients; tiled (tiled.py), one [b, tile] block at a time, recomputed in backward."""
        if tile >= n:
            return 3 * b * n * w, 5 * b * n * w
        return 2 * b * tile * w, 5 * b * tile * w

    def __init__(self, cfg: SAEConfig, features: range | None = None, device=None):
        super().__init__(cfg, features, device)
        self.log_threshold = nn.Parameter(torch.zeros(len(self.features), device=device))

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, mean: Tensor | None = None) -> None:
        super().reset_parameters(seed, mean)
        # centred pre-activations, z = w.(x - b_dec): uncentred, z carries the mean's projection, which
        # b_dec already reconstructs, so early firings hurt and thresholds climb until latents die
        self.b_enc.copy_(-(self.W_enc @ self.b_dec))
        self.log_threshold.fill_(math.log(initial_threshold(self.cfg, float(self.b_dec.pow(2).sum()))))

    @torch.no_grad()
    def init_from_data(self, sample: Callable[[], Tensor]) -> None:
        """With sae.threshold_init null: each latent's threshold where it fires on k / n_features of the
        sample's rows, so that every latent starts alive at the same density (one global threshold
        leaves the latents whose pre-activations vary less than average silent from the start)."""
        if self.cfg.threshold_init is not None:
            return
        x = sample()
        rank = min(len(x), max(1, round(len(x) * (1 - self.cfg.k / self.cfg.n_features))))
        for t in tiles(len(self.features), self.tile()):
            z = torch.addmm(self.b_enc[t], x.to(self.W_enc.dtype), self.W_enc[t].t())
            self.log_threshold[t] = z.kthvalue(rank, dim=0).values.clamp(min=MIN_THRESHOLD).log()

    def param_groups(self) -> list[dict]:
        """The thresholds learn at threshold_lr_scale times the other parameters' rate."""
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest, "lr_scale": 1.0}, {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale}]

    def pre_acts(self, x: Tensor) -> Tensor:
        return F.linear(self.comm.enter(x), self.W_enc, self.b_enc)

    def dense_code(self, x: Tensor) -> Tensor:
        """[batch, local features] latent activations, differentiable (the threshold's gradient
        reaches it through every entry near theta, zero or not)."""
        return _JumpReLU.apply(self.pre_acts(x), self.log_threshold.exp(), self.cfg.bandwidth)

    def encode(self, x: Tensor) -> SparseCode:
        return SparseCode.from_dense(self.dense_code(x))

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> ForwardOutput:
        x, d = self.comm.enter(x), x.shape[1]
        dead = self.dead_mask().to(x.dtype)
        if self.tile() < len(self.features):  # tiled: no [batch, features] tensor kept for backward
            out, fired = tiled_sum(self.decode_tile, self.tile(), x, self.W_enc, self.b_enc, self.W_dec,
                                   self.log_threshold, dead)
        else:
            out, f = self.decode_tile(x, self.W_enc, self.b_enc, self.W_dec, self.log_threshold, dead)
            fired = self.count_fired(f)
        x_hat = self.comm.reduce(out[:, :d]) + self.b_dec
        sparsity = self.comm.reduce(self.cfg.sparsity_coef * sparsity_scale * out[:, d].mean())
        aux = self.comm.reduce(self.cfg.aux_coef / self.cfg.n_features * out[:, d + 1].mean())
        return self._finish(x, x_hat, sparsity, aux, fired)

    def decode_tile(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, log_threshold: Tensor,
                    dead: Tensor) -> tuple[Tensor, Tensor]:
        """([batch, d + 2] partial reconstruction | L0 | dead latents' distance below threshold, code f)
        of a block of features."""
        z = F.linear(x, W_enc, b_enc)
        theta = log_threshold.exp()
        f = _JumpReLU.apply(z, theta, self.cfg.bandwidth)
        x_hat = (f * self.inv_decoder_norm(W_dec)) @ W_dec
        l0 = _Step.apply(z, theta, self.cfg.bandwidth).sum(1, keepdim=True)
        below = ((theta - z).relu() * dead).sum(1, keepdim=True)
        return torch.cat([x_hat, l0, below], dim=1), f
