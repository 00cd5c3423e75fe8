"""What every architecture shares: the config, the forward output, the parameters and their
deterministic initialisation, and the no-op communicator of a single, unsharded process.

An SAE module holds one contiguous block of features, `features = range(start, stop)` of
`cfg.n_features`: every per-feature tensor has the features along dim 0 (`W_enc`, `W_dec` are
`[features, d_model]`, like nn.Linear's and nn.Embedding's weights). Modules never import
torch.distributed: where a feature-sharded forward must communicate they call `self.comm`, which
`pipeline.parallel` replaces; the default `Local` does nothing.

Every architecture is a registered subclass (`@register`, the `CLASSES` registry) that declares
its traits: what the planner, the release writer, the model card and the scaling fit need to know
about it. Nothing outside pipeline/sae/ tests an architecture's name, so a new architecture is one
file here (imported by pipeline/sae/__init__.py) and conf/sae/<name>.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError

DEAD_TOKENS = 10_000_000
"""Gao et al.'s (and Anthropic's) dead-latent window: no activation over this many tokens."""

CLASSES: dict[str, type[SparseAutoencoder]] = {}
"""Every architecture by name, filled by @register as pipeline/sae/__init__.py imports their files."""


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Class decorator: make `cls` the architecture named `cls.architecture`."""
    if not cls.architecture or cls.architecture in CLASSES:
        raise ValueError(f"{cls.__name__}.architecture={cls.architecture!r} is empty or already registered")
    CLASSES[cls.architecture] = cls
    return cls


def sae_class(architecture: str, key: str = "architecture") -> type[SparseAutoencoder]:
    """The class of a registered architecture; `key` names the setting in the error."""
    if architecture not in CLASSES:
        raise ConfigError(f"{key}={architecture!r} is not one of {list(CLASSES)}. Fix: pick one of those "
                          "(a new architecture is a @register'ed class in pipeline/sae/)")
    return CLASSES[architecture]


def create(cfg: SAEConfig, features: range | None = None, device=None) -> SparseAutoencoder:
    """An SAE of cfg.architecture holding `features` (default: all), parameters not initialised
    (call reset_parameters); on device="meta" nothing is allocated."""
    return sae_class(cfg.architecture, "sae.architecture")(cfg, features, device)


@dataclass
class SAEConfig:
    architecture: str = "topk"
    """relu_l1, topk, jumprelu, batchtopk or another registered one (one file each in pipeline/sae/)."""
    n_features: int = 4096
    """Dictionary size (all shards together)."""
    d_model: int | None = None
    """Input width; taken from the activation store when unset, checked against it when set."""
    k: int = 32
    """topk: active latents per token; batchtopk: average active latents per token."""
    k_aux: int = 256
    """topk, batchtopk: dead latents used by the AuxK loss (0 turns AuxK off)."""
    aux_coef: float = 1 / 8
    """topk, batchtopk: alpha, the weight of the AuxK loss. Gao et al. use 1/32 with a 10M-token
    dead window; with the recipe's shorter windows (pipeline/train/recipe.py) 1/8 revives latents
    within the run (BENCHMARKS.md "Training recipe": 0.8% dead instead of 1.8%, equal FVU).
    jumprelu: the weight of the pre-activation loss on dead latents (pipeline/sae/jumprelu.py)."""
    dead_tokens: int | None = None
    """A latent that fired on none of the last this-many tokens is dead (AuxK and the dead fraction).
    None: the trainer's recipe (pipeline/train/recipe.py: DEAD_TOKENS, at most a 64th of the run);
    an SAE built outside the trainer uses DEAD_TOKENS."""
    sparsity_coef: float = 5.0
    """lambda: relu_l1's weight of sum_i f_i ||W_dec,i||; jumprelu's weight of the L0 penalty."""
    decoder_init_norm: float = 0.1
    """relu_l1: initial norm of each decoder row (unit-norm architectures always start at 1)."""
    threshold_init: float | None = None
    """jumprelu: initial threshold of every latent, in normalised input units (E||x||^2 = d_model, where
    a unit-norm encoder row's pre-activation has an RMS of about 1). None: in the trainer, each latent's
    threshold where it fires on k / n_features of the first batch's rows (JumpReLU.init_from_data), so
    that a run starts near k active latents per token with every latent alive; an SAE built outside the
    trainer starts where a normal pre-activation of the centred input fires that often (initial_threshold).
    Thresholds learn in log space, about lr per step at most, so for a few thousand steps L0 stays near
    that start (BENCHMARKS.md); Gemma Scope's 0.001 (in its units, E||x||^2 = 1) starts nearly dense and
    needs ~1e5 steps to get sparse."""
    bandwidth: float = 0.05
    """jumprelu: width epsilon of the straight-through estimators' rectangle kernel, in the same units:
    wide enough that a batch puts a few pre-activations of each latent in the window around its
    threshold (Gemma Scope's 0.001 in its units is about 0.03 of a pre-activation's RMS)."""
    threshold_lr_scale: float = 30.0
    """jumprelu: the thresholds' learning rate over the encoder's. Adam moves a pre-activation by up to
    ~lr * sum_j |x_j| per step (sum_j |x_j| ~ 0.8 d_model in our units) but a log-threshold by ~lr,
    so at one rate for both the thresholds cannot follow the pre-activations and lambda hardly
    moves the L0 (BENCHMARKS.md "jumprelu")."""
    b_dec_init: str = "mean"
    """mean (the normalised data mean; far fewer dead latents) or zero."""
    unit_norm_decoder: bool | None = None
    """Decoder rows used as W_dec,i / ||W_dec,i||. None: the architecture's default (all but
    relu_l1). Exported checkpoints set False: their rows carry the folded input scale."""
    scan_precision: str = "auto"
    """topk: the precision of the encoder's dense matmul, the one that picks each token's latents. bf16:
    that matmul in bf16 proposes 2k candidates per token, whose pre-activations are then computed
    exactly in the weights' dtype (sparse.gather_dot) and the k largest kept, so the code is the
    exact one unless a latent beyond the 2k is within bf16 rounding (~0.4%) of the k-th. exact: the
    weights' dtype throughout. auto: bf16 where the weights are fp32 and the device multiplies bf16
    natively (pipeline/sae/sparse.py native_bf16_matmul: 3.7x fp32's speed on an AVX512-BF16 CPU), else
    exact. batchtopk and the others are always exact."""
    feature_tile: int = 0
    """Features per encoder tile in training (0: the whole local shard at once). Tiled, no
    [batch, local features] matrix is ever formed: topk/batchtopk keep a running top-k over the
    tiles; relu_l1/jumprelu recompute each tile in backward (one more encoder matmul per step).
    Results equal the untiled step to float rounding (pipeline/sae/tiled.py)."""

    def __post_init__(self):
        uses_k = sae_class(self.architecture, "sae.architecture").uses_k
        if not self.n_features >= 1:  # `not` so that NaN fails too
            raise ConfigError(f"sae.n_features={self.n_features} must be positive")
        if uses_k and not 1 <= self.k <= self.n_features:
            raise ConfigError(f"sae.k={self.k} must be in [1, n_features={self.n_features}]")
        if self.k_aux < 0 or (self.dead_tokens is not None and self.dead_tokens < 1):
            raise ConfigError(f"sae.k_aux={self.k_aux} must be >= 0 and sae.dead_tokens={self.dead_tokens} >= 1")
        if self.b_dec_init not in ("mean", "zero"):
            raise ConfigError(f"sae.b_dec_init={self.b_dec_init!r} must be 'mean' or 'zero'")
        if self.scan_precision not in ("auto", "exact", "bf16"):
            raise ConfigError(f"sae.scan_precision={self.scan_precision!r} must be 'auto', 'exact' or 'bf16'")
        if self.feature_tile < 0:
            raise ConfigError(f"sae.feature_tile={self.feature_tile} must be >= 0 (0: no tiling)")
        if self.architecture == "jumprelu" and self.threshold_init is None and not 1 <= self.k < self.n_features:
            raise ConfigError(f"sae.k={self.k} must be in [1, n_features={self.n_features}) to set jumprelu's "
                              "initial thresholds (sae.threshold_init=null); or set sae.threshold_init")
        if not self.threshold_lr_scale > 0:
            raise ConfigError(f"sae.threshold_lr_scale={self.threshold_lr_scale} must be positive")
        if self.bandwidth <= 0 or (self.threshold_init is not None and self.threshold_init <= 0):
            raise ConfigError(f"sae.bandwidth={self.bandwidth} and sae.threshold_init={self.threshold_init} "
                              "must be positive")


class ForwardOutput(NamedTuple):
    """Every value is for the whole dictionary (summed over feature shards). `loss`, `mse` and
    `aux` are means over this process's batch; backpropagate `loss`."""

    x_hat: Tensor     # [batch, d_model] reconstruction
    loss: Tensor      # mse + sparsity + aux
    mse: Tensor       # mean over tokens of ||x - x_hat||^2
    sparsity: Tensor  # the weighted sparsity penalty (0 for topk, batchtopk)
    aux: Tensor       # the weighted AuxK loss (0 where unused)
    l0: Tensor        # mean number of active latents per token (no grad)
    fired: Tensor     # [local features] tokens of this batch on which each latent fired (no grad)


class SparseCode(NamedTuple):
    """The latents of a batch, every architecture alike: row i's active latents are values[i, j] at
    local feature indices[i, j] (int64, of this module's features). Rows hold the same number of
    entries; a zero in `values` is padding (its index means nothing), so add, never assign, when
    scattering."""

    values: Tensor   # [batch, m]
    indices: Tensor  # [batch, m] int64

    @classmethod
    def from_dense(cls, f: Tensor) -> SparseCode:
        """The non-zeros of a dense code [batch, n], each row's in ascending feature order, padded
        with zeros to the most any row has (at least 1). Differentiable in the kept values."""
        nonzero = f != 0
        counts = nonzero.sum(1, keepdim=True)
        width = max(int(counts.max()) if f.shape[0] else 0, 1)
        # a stable sort of "is zero" puts each row's non-zeros first, in feature order
        indices = (~nonzero).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
        kept = torch.arange(width, device=f.device) < counts  # padding: no gradient to the zeros it points at
        return cls(torch.where(kept, f.gather(1, indices), 0.0), indices)

    def dense(self, n: int) -> Tensor:
        """[batch, n] code with each value at its index (n: the module's local features)."""
        return self.values.new_zeros(self.values.shape[0], n).scatter_add(1, self.indices, self.values)


class Local:
    """Communication of an unsharded SAE in one process: all identities. pipeline.parallel's
    FeatureComm has the same methods with collectives behind them."""

    def enter(self, x: Tensor) -> Tensor:
        """Where a replicated tensor enters the sharded encoder (backward: sum over shards)."""
        return x

    def reduce(self, x: Tensor) -> Tensor:
        """Sum of per-shard partial results (forward: sum over shards; backward: identity)."""
        return x

    def gather_features(self, t: Tensor) -> Tensor:
        """[batch, c] from every feature shard, concatenated along dim 1. No grad."""
        return t

    def gather_all(self, t: Tensor) -> Tensor:
        """1-D tensors of equal length from every rank of the world, concatenated. No grad."""
        return t

    def sum_features(self, t: Tensor) -> Tensor:
        """Sum over feature shards, no grad (statistics)."""
        return t

    def sum_batch(self, t: Tensor) -> Tensor:
        """Sum over data-parallel ranks, no grad: statistics of the global batch."""
        return t


def feature_rows(seed: int, name: str, features: range, d: int, block: int = 4096) -> Tensor:
    """Gaussian rows for `features`, generated in fixed blocks of the full dictionary, so that a
    shard's rows are the same as those rows of an unsharded model, and no rank builds them all."""
    salt = sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 1_000_003
    out = []
    for b in range(features.start // block, (features.stop - 1) // block + 1 if len(features) else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + salt * 65_537 + b)
        rows = torch.randn(block, d, generator=g)
        lo, hi = max(features.start, b * block) - b * block, min(features.stop, (b + 1) * block) - b * block
        out.append(rows[lo:hi])
    return torch.cat(out) if out else torch.empty(0, d)


class SparseAutoencoder(nn.Module):
    """Base of every architecture: W_enc, b_enc, W_dec (sharded along features) and b_dec
    (replicated), plus the dead-latent counter. Subclasses write encode() and forward()."""

    architecture = ""
    unit_norm_default = True
    feature_tensors = ("W_enc", "b_enc", "W_dec", "tokens_since_fired")
    """Names of the tensors with features along dim 0: sharded, exported shard by shard."""

    # -- traits, read by the stages instead of the architecture's name. The defaults are a plain
    # ReLU SAE's, f = ReLU(W_enc x + b_enc).
    uses_k = False
    """cfg.k sets the sparsity: it is checked, and plans, cards and scaling fits state it."""
    sparse_step = False
    """The training step works on the few active latents per token beyond the encoder's matmul:
    the planner and the scaling fit count its sparse FLOPs (pipeline/cost_model.py step_flops)."""
    recipe_lr_scale = 1.0
    """The default recipe's rate for this architecture over topk's (pipeline/train/recipe.py), on
    which the recipe's constant was measured."""
    saelens_architecture = "standard"
    """The SAELens inference class that computes the same latents (pipeline/publish/release.py)."""
    saelens_apply_b_dec_to_input = False
    """Whether that class encodes x - b_dec."""
    saelens_note = ""
    """A sentence for a release's model card when the SAELens form needs explaining."""

    @classmethod
    def saelens_config(cls, config: dict) -> dict:
        """SAELens cfg.json keys of this architecture beyond the common ones, from our exported
        config (asdict of the SAEConfig)."""
        return {}

    @classmethod
    def saelens_state(cls, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(SAELens tensors, extras) from our exported state dict. SAELens keeps W_enc as
        [d_in, d_sae]; extras hold what its layout lacks, so that a release reloads bit for bit."""
        return {"W_enc": state["W_enc"].t().contiguous(), "W_dec": state["W_dec"].contiguous(),
                "b_enc": state["b_enc"].contiguous(), "b_dec": state["b_dec"].contiguous()}, {}

    # -- the planner's terms (pipeline/cost_model.py): arithmetic on one rank's shard of n features,
    # no tensors. tests/test_plan.py checks the counts against modules built on the meta device.
    @classmethod
    def planned_parameters(cls, d: int, n: int) -> list[int]:
        """Sizes of the trainable tensors: W_enc and W_dec [n, d], b_enc [n], b_dec [d] (replicated)."""
        return [n * d, n * d, n, d]

    @classmethod
    def planned_buffer_bytes(cls, n: int, float_bytes: int) -> int:
        """Non-trainable state: the int64 tokens-since-fired counter per feature. float_bytes: the
        module's float dtype (DeepSpeed casts float buffers too)."""
        return 8 * n

    @classmethod
    def planned_communication_bytes(cls, b: int, k: int, fp: int) -> int:
        """Communication buffers beyond the [b, d] all-reduces every architecture has (b local
        tokens, fp feature shards)."""
        return 0

    @classmethod
    def planned_transients(cls, b: int, n: int, d: int, k: int, tile: int, w: int, auxk: bool) -> tuple[int, int]:
        """(forward, backward) bytes of the step's transient tensors beyond the few [b, d] ones
        every architecture has: b local tokens, n local features, `tile` features at a time, w
        bytes per value, auxk: AuxK runs (dead latents exist)."""
        raise NotImplementedError(f"{cls.__name__} states no step transients for the planner")

    def __init__(self, cfg: SAEConfig, features: range | None = None, device=None):
        super().__init__()
        if cfg.d_model is None:
            raise ConfigError("SAEConfig.d_model is unset; set it or take it from the activation store")
        self.cfg = cfg
        self.features = features if features is not None else range(cfg.n_features)
        self.unit_norm = self.unit_norm_default if cfg.unit_norm_decoder is None else cfg.unit_norm_decoder
        n, d = len(self.features), cfg.d_model
        kw = {"device": device, "dtype": torch.float32}
        self.W_enc = nn.Parameter(torch.zeros(n, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n, d, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d, **kw))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64, device=device))
        self.comm = Local()

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, mean: Tensor | None = None) -> None:
        """Tied init: random unit directions for the decoder rows (scaled to decoder_init_norm
        where the norm is free), W_enc = W_dec, biases 0, b_dec the data mean if given."""
        rows = feature_rows(seed, "W_dec", self.features, self.cfg.d_model)
        rows = rows / rows.norm(dim=1, keepdim=True)
        if not self.unit_norm:
            rows = rows * self.cfg.decoder_init_norm
        self.W_dec.copy_(rows)
        self.W_enc.copy_(rows)
        self.b_enc.zero_()
        self.b_dec.copy_(mean if mean is not None and self.cfg.b_dec_init == "mean" else torch.zeros_like(self.b_dec))
        self.tokens_since_fired.zero_()

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups, each {"params": [...], "lr_scale": its rate over the
        recipe's}: one group of every parameter by default."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def init_from_data(self, sample: Callable[[], Tensor]) -> None:
        """The data-dependent part of the initialisation, after reset_parameters: `sample()` reads
        normalised training rows, the same on every rank (the trainer's first global batch). Nothing
        by default (no read); an architecture whose good start depends on the data overrides it."""

    def decoder_weight(self, W_dec: Tensor | None = None) -> Tensor:
        """W_dec (or a block of its rows) as used: rows divided by their norm for unit-norm
        architectures. Autograd then removes each row's gradient component parallel to the row
        (Gao et al.), and the constraint holds exactly whatever the optimizer does (no step hook,
        no ZeRO surgery)."""
        W = self.W_dec if W_dec is None else W_dec
        return W / W.norm(dim=1, keepdim=True) if self.unit_norm else W

    def tile(self) -> int:
        """Features per encoder tile of this shard (all of them when untiled)."""
        n = len(self.features)
        return min(self.cfg.feature_tile, n) if self.cfg.feature_tile > 0 else n

    def inv_decoder_norm(self, W_dec: Tensor | None = None) -> Tensor:
        """[local features] (or [rows of W_dec]) factor that turns W_dec rows into the rows used
        (1 if the norm is free)."""
        W = self.W_dec if W_dec is None else W_dec
        if not self.unit_norm:
            return torch.ones(W.shape[0], device=W.device, dtype=W.dtype)
        return W.norm(dim=1).reciprocal()

    @property
    def dead_tokens(self) -> int:
        return DEAD_TOKENS if self.cfg.dead_tokens is None else self.cfg.dead_tokens

    def dead_mask(self) -> Tensor:
        """Latents that fired on none of the last dead_tokens tokens (before this batch)."""
        return self.tokens_since_fired >= self.dead_tokens

    @staticmethod
    def count_fired(f: Tensor) -> Tensor:
        """[features] tokens on which each latent of a non-negative dense code [batch, features]
        fired. (sign().sum(0) is ~5x faster on CPU than (f > 0).sum(0), which widens bools to int64.)"""
        with torch.no_grad():
            return torch.sign(f).sum(0).long()

    def _finish(self, x: Tensor, x_hat: Tensor, sparsity: Tensor, aux: Tensor, fired: Tensor) -> ForwardOutput:
        """The common tail of forward(): MSE, L0 and the dead-latent counter."""
        mse = (x.float() - x_hat.float()).pow(2).sum(-1).mean()  # fp32 under bf16 (engine.py); a no-op in fp32
        n = x.shape[0]
        l0 = self.comm.sum_features(fired.sum().float()) / n
        if self.training:
            with torch.no_grad():
                # one all-reduce for the fired counts and the token count of the global batch
                total = self.comm.sum_batch(torch.cat([fired.long(), fired.new_tensor([n], dtype=torch.long)]))
                self.tokens_since_fired.add_(total[-1]).masked_fill_(total[:-1] > 0, 0)
        return ForwardOutput(x_hat, mse + sparsity.float() + aux.float(), mse, sparsity, aux, l0, fired)

    def forward(self, x: Tensor, sparsity_scale: float = 1.0) -> ForwardOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.architecture}, d_model={self.cfg.d_model}, features={self.features.start}.."
                f"{self.features.stop} of {self.cfg.n_features}")
