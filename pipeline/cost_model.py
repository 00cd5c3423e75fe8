"""The cost model of training a feature-sharded SAE: per-rank memory, communication, FLOPs and
step time of one training step, for a layout (data_parallel x feature_parallel).

A lower layer shared by the stages: the planner (pipeline/plan) prints it, the trainer's dry run
(pipeline/train/dry_run.py) checks it against the real modules, the scaling fit (pipeline/scaling)
counts compute with it. Everything here is arithmetic on the configuration: no tensor, no
allocation, so a 34M-feature plan for 64 GPUs computes in milliseconds. What differs between
architectures is read from their classes (the planned_* terms and sparse_step of
pipeline/sae/base.py). `tests/test_plan.py` checks the parameter and state bytes against the real
sharded modules built on the meta device."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from pipeline.errors import ConfigError
from pipeline.sae import SAEConfig, sae_class
from pipeline.step import StepConfig, check_precision

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
POSITIVE = ("sae.d_model", "sae.n_features", "batch_size", "data.shuffle_buffer", "gpu_memory_gb", "gpus_per_node",
            "usable_fraction", "tflops", "mem_bandwidth_gbs", "intra_node_gbs", "inter_node_gbs")
NON_NEGATIVE = ("runtime_gb", "data_parallel", "feature_parallel", "max_gpus")


@dataclass
class PlanConfig(StepConfig):
    """A training step to plan and the machines to plan it on. The step is the trainer's own sections
    (pipeline/step.py: sae.*, batch_size, optim.*, deepspeed.*, data.*, the same keys as `python -m
    pipeline.train`); the cost model reads sae.architecture, d_model, n_features, k, k_aux and
    feature_tile, batch_size, optim.state_dtype, deepspeed.zero_stage and precision, and
    data.shuffle_buffer, and no other (optim.lr, say, changes no byte). deepspeed.precision=auto
    plans bf16: the planned run is on GPUs. The rest is the planner's own."""

    sae: SAEConfig = field(default_factory=lambda: SAEConfig(d_model=4096, n_features=2**25))
    """The dictionary to plan; the planner's example is 34M features at Llama-3.1-8B's width (the
    conf/plan/size and conf/plan/target options set n_features and d_model; d_model must be set:
    there is no store to read it from). Planned as if AuxK runs (sae.k_aux > 0): its backward holds
    two more [n_local, d] gradients."""
    data_parallel: int = 0
    """The layout's data-parallel degree (train's parallel.data_parallel); 0: the planner picks the
    smallest layout that fits, then replicates up to max_gpus."""
    feature_parallel: int = 0
    """The layout's feature-parallel degree (train's parallel.feature_parallel); 0: the smallest that fits."""
    max_gpus: int = 0
    """0: no data parallelism beyond what memory needs."""
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    usable_fraction: float = 0.9
    """Share of GPU memory the plan may fill (the rest: allocator fragmentation)."""
    runtime_gb: float = 0.5
    """Per-rank memory that is no tensor of the step: the framework itself (CPU: torch, DeepSpeed,
    gloo and loader threads, allocator arenas, ~0.5 GiB measured per rank, constant in n_features;
    GPU: the CUDA context, similar)."""
    tflops: float = 400.0
    """Sustained dense matmul rate per GPU in the param dtype (H100 bf16 ~400-700; measure yours)."""
    mem_bandwidth_gbs: float = 2000.0
    """GPU memory bandwidth: Adam's update over every parameter is bandwidth-bound."""
    intra_node_gbs: float = 200.0
    """All-reduce bus bandwidth inside a node (NVLink)."""
    inter_node_gbs: float = 25.0
    """All-reduce bus bandwidth across nodes (e.g. 200 Gb/s InfiniBand per GPU)."""

    @property
    def param_dtype(self) -> str:
        """Dtype of the weights the step computes with: deepspeed.precision, auto being bf16 on GPU
        (bf16 keeps fp32 masters in the optimizer)."""
        return "float32" if self.deepspeed.precision == "fp32" else "bfloat16"

    @property
    def loader_bytes(self) -> int:
        """Host memory of the loader: two windows of data.shuffle_buffer fp32 rows (the one being
        batched, the next being read)."""
        return 2 * self.data.shuffle_buffer * self.sae.d_model * 4

    def __post_init__(self):
        if self.sae.d_model is None:
            raise ConfigError("sae.d_model is not set: the planner has no activation store to read the width "
                              "from. Fix: sae.d_model=<width>, or plan/target=<model> (conf/plan/target)")
        try:
            check_precision("fp32" if self.param_dtype == "float32" else "bf16", self.deepspeed.zero_stage)
        except ConfigError as e:  # the trainer refuses it too, on GPUs
            raise ConfigError(f"deepspeed.precision={self.deepspeed.precision} plans bf16 on GPUs: {e}") from None
        for name in POSITIVE + NON_NEGATIVE:
            value = _get(self, name)
            if not (value > 0 if name in POSITIVE else value >= 0):  # `not` so that NaN fails too
                raise ConfigError(f"{name}={value} must be {'positive' if name in POSITIVE else '>= 0'} "
                                  f"(default {name}={_default(type(self), name)})")
        if not self.usable_fraction <= 1:
            raise ConfigError(f"usable_fraction={self.usable_fraction} must be in (0, 1]: the share of GPU memory "
                              "the plan may fill")


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _default(cls: type, path: str):
    """The default of a (dotted) field of the dataclass `cls`."""
    head, _, rest = path.partition(".")
    f = next(f for f in fields(cls) if f.name == head)
    value = f.default if f.default is not MISSING else f.default_factory()
    return _get(value, rest) if rest else value


def training_plan(step: StepConfig, **changes) -> PlanConfig:
    """The planner's config of a training configuration (a TrainConfig): its step sections as they are,
    `changes` replacing any of them and setting the planner's own fields."""
    return PlanConfig(**{**{f.name: getattr(step, f.name) for f in fields(StepConfig)}, **changes})


def local_features(n_features: int, feature_parallel: int) -> int:
    """Features on the largest shard (the first n % fp shards hold one more)."""
    return math.ceil(n_features / feature_parallel)


def shard_tensors(architecture: str, d: int, n_local: int) -> list[int]:
    """Sizes of the trainable tensors on one rank: W_enc and W_dec [n, d], b_enc [n], b_dec [d]
    (replicated), plus the architecture's own (jumprelu's log-threshold [n])."""
    return sae_class(architecture).planned_parameters(d, n_local)


def shard_parameters(architecture: str, d: int, n_local: int) -> int:
    return sum(shard_tensors(architecture, d, n_local))


def low_bit_state_bytes(numel: int, state_dtype: str) -> int:
    """Adam's m and v for one tensor of `numel` values as torchao stores them (fp8/int8): tensors of
    at least 4096 values that split into 256-value blocks get 1 byte per value plus an fp32 scale
    per block (int8: and a 256-entry fp32 code table per state); the others keep fp32."""
    if numel < 4096 or numel % 256:
        return 8 * numel
    return 2 * (numel + 4 * (numel // 256) + (4 * 256 if state_dtype == "int8" else 0))


def shard_buffers_bytes(architecture: str, n_local: int, float_bytes: int = 4) -> int:
    """Non-trainable state: the int64 tokens-since-fired counter per feature, plus the
    architecture's own (batchtopk's running threshold, a float in the module's dtype: DeepSpeed
    casts buffers too, and its step count)."""
    return sae_class(architecture).planned_buffer_bytes(n_local, float_bytes)


@dataclass
class RankMemory:
    """Per-rank bytes. The state (weights, master weights, optimizer state, buffers, communication
    buffers) lives all along; the gradients exist from backward to the end of the optimizer step
    (ZeRO and zero_grad free them); the transients of the three phases never coexist."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_state: int
    buffers: int
    communication: int
    forward: int
    """Forward transients (no gradients yet): encoder tiles, codes kept for backward."""
    backward: int
    """Backward transients beside the gradients: codes, their gradients, gradient temporaries."""
    optimizer_step: int
    """Optimizer-step transients beside the gradients: ZeRO's flat gradient partition, the
    gradient norm's fp64 copy."""
    runtime: int = 0
    """The framework's own memory (PlanConfig.runtime_gb)."""

    @property
    def activations(self) -> int:
        """The larger forward/backward transient (the plan's "activations per step")."""
        return max(self.forward, self.backward)

    @property
    def total(self) -> int:
        """Peak bytes of a step: the state, plus the largest phase."""
        return (self.weights + self.master_weights + self.optimizer_state + self.buffers + self.communication
                + self.runtime + max(self.forward, self.gradients + self.backward, self.gradients + self.optimizer_step))


def activation_bytes(architecture: str, b: int, n: int, d: int, k: int, tile: int, w: int,
                     auxk: bool = True) -> tuple[int, int]:
    """(forward, backward) transient bytes on one rank, as pipeline/sae builds them (b local tokens,
    n local features, `tile` features at a time, w bytes per value). Checked against measured
    steps by benchmarks/train_scaling.py (BENCHMARKS.md).

    Every architecture: a few [b, d] fp32 tensors in both phases (x, x_hat, the error, their
    gradients); plus its own (its class's planned_transients): topk/batchtopk the encoder's
    pre-activation tiles and running top-k's, in backward AuxK's two extra [n, d] gradients;
    relu_l1/jumprelu untiled their [b, n] codes kept for backward, tiled the same per [b, tile]
    block, recomputed in backward."""
    rows = 6 * b * d * 4
    forward, backward = sae_class(architecture).planned_transients(b, n, d, k, tile, w, auxk)
    return forward + rows, backward + rows


def rank_memory(cfg: PlanConfig, dp: int, fp: int) -> RankMemory:
    sae, zero, state_dtype = cfg.sae, cfg.deepspeed.zero_stage, cfg.optim.state_dtype
    n = local_features(sae.n_features, fp)
    p = shard_parameters(sae.architecture, sae.d_model, n)
    w = BYTES[cfg.param_dtype]
    part = dp if zero >= 1 else 1          # ZeRO-1 partitions fp32 masters and Adam m, v
    gpart = dp if zero >= 2 else 1         # ZeRO-2 also the gradients
    # DeepSpeed keeps an fp32 master partition under bf16, and under ZeRO >= 1 even in fp32 (its
    # optimizer steps a flat clone of the partition, not the module's own parameters)
    master = 0 if cfg.param_dtype == "float32" and zero == 0 else 4 * math.ceil(p / part)
    b = math.ceil(cfg.batch_size / dp)
    tile = min(sae.feature_tile or n, n)
    d = sae.d_model
    forward, backward = activation_bytes(sae.architecture, b, n, d, sae.k, tile, w, sae.k_aux > 0)
    # After backward (DeepSpeed, stage_1_and_2.py): ZeRO >= 1 moves the gradients one at a time
    # into a contiguous reduce bucket (they then live there: no second copy); in the step the
    # global norm converts each gradient to fp64 in turn (the largest: [n, d]), then this rank's
    # gradient partition is flattened into a new fp32 tensor while the gradients still exist.
    # ZeRO-0 in fp32 steps in place.
    if zero >= 1:
        step = max(8 * n * d, math.ceil(p / part) * (w + (4 if w != 4 else 0)))
    else:
        step = 0 if w == 4 else 4 * n * d
    communication = 2 * b * d * 4 + sae_class(sae.architecture).planned_communication_bytes(b, sae.k, fp)
    if state_dtype == "fp32":
        state = 8 * math.ceil(p / part)
    else:  # one parameter group per tensor (pipeline/train/engine.py), each partitioned on its own
        state = sum(low_bit_state_bytes(math.ceil(t / part), state_dtype)
                    for t in shard_tensors(sae.architecture, d, n))
    return RankMemory(weights=p * w, gradients=math.ceil(p / gpart) * w, master_weights=master,
                      optimizer_state=state, buffers=shard_buffers_bytes(sae.architecture, n, w),
                      communication=communication, forward=forward, backward=backward, optimizer_step=step,
                      runtime=int(cfg.runtime_gb * 2**30))


def step_flops(cfg: PlanConfig) -> tuple[float, float]:
    """(dense, sparse) FLOPs of one step for the whole batch: dense ~10 d F per token (encoder,
    decoder, their weight gradients, the gradient w.r.t. the code); sparse (topk) ~2 d F for the
    encoder plus ~8 k d per token for everything the inactive latents do not need."""
    t, d, f = cfg.batch_size, cfg.sae.d_model, cfg.sae.n_features
    return 10.0 * t * d * f, 2.0 * t * d * f + 8.0 * t * cfg.sae.k * d


def training_flops(cfg: PlanConfig) -> float:
    """FLOPs of one step of cfg.sae.architecture: the sparse count if its step is sparse, else the dense."""
    dense, sparse = step_flops(cfg)
    return sparse if sae_class(cfg.sae.architecture).sparse_step else dense


@dataclass
class Plan:
    cfg: PlanConfig
    data_parallel: int
    feature_parallel: int
    memory: RankMemory
    fits: bool
    nodes: int
    comm_bytes_per_step: int
    comm_bytes_across_nodes: int
    flops_per_step: float
    step_seconds: float

    @property
    def gpus(self) -> int:
        return self.data_parallel * self.feature_parallel

    @property
    def tokens_per_second(self) -> float:
        return self.cfg.batch_size / self.step_seconds


def make_plan(cfg: PlanConfig, dp: int, fp: int) -> Plan:
    mem = rank_memory(cfg, dp, fp)
    budget = cfg.gpu_memory_gb * 2**30 * cfg.usable_fraction
    b, d = math.ceil(cfg.batch_size / dp), cfg.sae.d_model
    p = shard_parameters(cfg.sae.architecture, d, local_features(cfg.sae.n_features, fp))
    # Per step and rank: the forward all-reduce of [b, d] fp32 partial reconstructions over the
    # feature group and the matching one of the input's gradient; the gradient all-reduce of the
    # shard's parameters over the data-parallel group (ring: ~2x the bytes).
    fp_bytes = 2 * (2 * b * d * 4) * (fp > 1)
    dp_bytes = 2 * p * BYTES[cfg.param_dtype] * (dp > 1)
    nodes = math.ceil(dp * fp / cfg.gpus_per_node)
    # Feature groups are consecutive ranks: they stay inside a node when fp <= gpus_per_node, and
    # then only the data-parallel gradient all-reduce crosses node boundaries.
    fp_cross = fp > cfg.gpus_per_node
    cross = (fp_bytes if fp_cross else 0) + (dp_bytes if nodes > 1 else 0)
    flops = training_flops(cfg)
    compute = flops / (dp * fp) / (cfg.tflops * 1e12)
    adam = (mem.weights + mem.gradients + mem.master_weights + mem.optimizer_state) * 2 / (cfg.mem_bandwidth_gbs * 1e9)
    comm = (fp_bytes / ((cfg.inter_node_gbs if fp_cross else cfg.intra_node_gbs) * 1e9)
            + dp_bytes / ((cfg.inter_node_gbs if nodes > 1 else cfg.intra_node_gbs) * 1e9))
    return Plan(cfg, dp, fp, mem, mem.total <= budget, nodes, fp_bytes + dp_bytes, cross, flops,
                compute + adam + comm)


def best_plan(cfg: PlanConfig) -> Plan:
    """The given layout, or the smallest feature-parallel degree that fits (data_parallel as given,
    default 1), then data parallelism on top up to max_gpus."""
    if cfg.data_parallel and cfg.feature_parallel:
        return make_plan(cfg, cfg.data_parallel, cfg.feature_parallel)
    dp = cfg.data_parallel or 1
    fp = cfg.feature_parallel
    if not fp:
        hi = 1
        while not make_plan(cfg, dp, hi).fits:
            hi *= 2
            if hi > 2 * cfg.sae.n_features:
                raise ConfigError(f"no feature-parallel degree fits {cfg.sae.n_features} features of width "
                                  f"{cfg.sae.d_model} in {cfg.gpu_memory_gb} GB per GPU")
        lo = hi // 2  # does not fit (or 0); binary search the smallest degree that does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if make_plan(cfg, dp, mid).fits else (mid, hi)
        fp = hi
    if not cfg.data_parallel and cfg.max_gpus:
        dp = max(1, cfg.max_gpus // fp)
    return make_plan(cfg, dp, fp)
