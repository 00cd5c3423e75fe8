"""Feature sharding: a `data_parallel x feature_parallel` layout of ranks, the collectives a
sharded SAE needs, and the model-parallel unit (`mpu`) that tells DeepSpeed about it.

Rank r has coordinates (dp, fp) = divmod(r, feature_parallel): the ranks of one feature-parallel
group are consecutive. Feature shard fp owns the contiguous block `feature_range(n, fp)`; its
encoder rows, decoder rows and per-feature parameters live only there (`p.model_parallel = True`,
which DeepSpeed's global gradient norm reads), b_dec is replicated. The forward all-reduces the
[batch, d_model] partial reconstructions over the feature group (Megatron's pair of functions
keeps the gradients exactly those of the unsharded model):

    replicated x --enter: identity fwd, all-reduce bwd--> sharded encoder/decoder
                 --reduce: all-reduce fwd, identity bwd--> replicated x_hat
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.sae import SAEConfig, SparseAutoencoder, create


@dataclass
class ParallelDims:
    data_parallel: int = 1
    """Replicas of the dictionary, each fed its slice of the global batch; ZeRO partitions the
    optimizer state across them."""
    feature_parallel: int = 1
    """Shards of the dictionary's features; the only per-step traffic between them is an
    all-reduce of [batch, d_model]."""

    def __post_init__(self):
        if self.data_parallel < 1 or self.feature_parallel < 1:
            raise ConfigError(f"parallel.data_parallel={self.data_parallel} and parallel.feature_parallel="
                              f"{self.feature_parallel} must both be >= 1")

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.feature_parallel

    def validate(self, world_size: int, n_features: int | None = None) -> None:
        """Check the layout against the launched world and the dictionary."""
        if world_size != self.world_size:
            raise ConfigError(
                f"parallel.data_parallel={self.data_parallel} x parallel.feature_parallel={self.feature_parallel} "
                f"= {self.world_size} ranks, but WORLD_SIZE={world_size} processes were launched. Fix: launch "
                f"{self.world_size} processes (torchrun --nproc_per_node={self.world_size} ...) or set the two "
                f"degrees so that their product is {world_size}")
        if n_features is not None and self.feature_parallel > n_features:
            raise ConfigError(f"parallel.feature_parallel={self.feature_parallel} is larger than sae.n_features="
                              f"{n_features}: some shards would hold no feature. Fix: use at most {n_features} "
                              "feature shards")

    def coords(self, rank: int) -> tuple[int, int]:
        """(data-parallel rank, feature-parallel rank) of a global rank."""
        return divmod(rank, self.feature_parallel)

    def feature_range(self, n_features: int, fp_rank: int) -> range:
        """Shard fp_rank's contiguous block; the first n_features % feature_parallel shards hold one more."""
        base, extra = divmod(n_features, self.feature_parallel)
        start = fp_rank * base + min(fp_rank, extra)
        return range(start, start + base + (fp_rank < extra))


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group the launcher (torchrun, deepspeed, srun) describes, to train on
    `device` (pipeline.device.resolve_device); a plain `python` run is a world of 1. Returns this
    rank's device. On CUDA each process takes the GPU of its LOCAL_RANK and the group is nccl, or
    gloo where the local ranks outnumber the GPUs (nccl needs a GPU per rank; two ranks on one GPU
    is how the device check compares layouts). On the CPU: gloo, and no CUDA call at all.
    DeepSpeed is told the same device before it is imported (DS_ACCELERATOR): left alone it picks
    the GPU whenever it sees one, also for a CPU run."""
    os.environ["DS_ACCELERATOR"] = device.type
    if device.type == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        device = torch.device("cuda", device.index if device.index is not None else local % gpus)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(_backend(device))
    return device


def _backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "gloo"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks <= torch.cuda.device_count():
        return "nccl"
    if int(os.environ["RANK"]) == 0:
        print(f"{local_ranks} ranks share {torch.cuda.device_count()} GPU(s) on this machine: gloo instead of nccl "
              "(nccl needs one GPU per rank), much slower; launch one process per GPU for real runs", flush=True)
    return "gloo"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mesh:
    """The process groups of a validated layout, for this rank."""

    def __init__(self, dims: ParallelDims, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        dims.validate(dist.get_world_size())
        self.dims = dims
        self.device_mesh = init_device_mesh(device.type, (dims.data_parallel, dims.feature_parallel),
                                            mesh_dim_names=("dp", "fp"))
        self.dp_group = self.device_mesh.get_group("dp")
        self.fp_group = self.device_mesh.get_group("fp")
        self.rank = dist.get_rank()
        self.dp_rank, self.fp_rank = dims.coords(self.rank)
        assert (self.dp_rank, self.fp_rank) == (self.device_mesh.get_local_rank("dp"),
                                                self.device_mesh.get_local_rank("fp"))

    def build_sae(self, cfg: SAEConfig, seed: int, mean: Tensor | None = None, device=None) -> SparseAutoencoder:
        """This rank's shard of the dictionary, initialised exactly as those rows of an unsharded
        one, communicating through this mesh, its sharded parameters marked for DeepSpeed."""
        self.dims.validate(dist.get_world_size(), cfg.n_features)
        sae = create(cfg, self.dims.feature_range(cfg.n_features, self.fp_rank), device=device)
        sae.reset_parameters(seed, mean)
        return self.shard(sae)

    def shard(self, sae: SparseAutoencoder) -> SparseAutoencoder:
        """Attach this mesh's communication to an SAE built for this rank's feature block."""
        expected = self.dims.feature_range(sae.cfg.n_features, self.fp_rank)
        if sae.features != expected:
            raise ValueError(f"rank {self.rank} owns features {expected}, the module holds {sae.features}")
        for name, p in sae.named_parameters():
            p.model_parallel = name in sae.feature_tensors
        sae.comm = FeatureComm(self)
        return sae

    def mpu(self) -> "MPU":
        return MPU(self)


class _Enter(torch.autograd.Function):
    """Identity in forward; sums the gradient over the feature group in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Reduce(torch.autograd.Function):
    """Sums over the feature group in forward; identity in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class FeatureComm:
    """pipeline.sae.Local's methods with the mesh's collectives behind them."""

    def __init__(self, mesh: Mesh):
        self.fp_group, self.dp_group = mesh.fp_group, mesh.dp_group
        self.fp, self.dp = mesh.dims.feature_parallel, mesh.dims.data_parallel

    def enter(self, x: Tensor) -> Tensor:
        return _Enter.apply(x, self.fp_group) if self.fp > 1 else x

    def reduce(self, x: Tensor) -> Tensor:
        return _Reduce.apply(x, self.fp_group) if self.fp > 1 else x

    def gather_features(self, t: Tensor) -> Tensor:
        if self.fp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.fp)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.fp_group)
        return torch.cat(parts, dim=1)

    def gather_all(self, t: Tensor) -> Tensor:
        if self.fp * self.dp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.fp * self.dp)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def sum_features(self, t: Tensor) -> Tensor:
        return self._sum(t, self.fp_group, self.fp)

    def sum_batch(self, t: Tensor) -> Tensor:
        return self._sum(t, self.dp_group, self.dp)

    @staticmethod
    def _sum(t: Tensor, group, size: int) -> Tensor:
        if size == 1:
            return t
        t = t.detach().contiguous().clone()
        dist.all_reduce(t, group=group)
        return t


class MPU:
    """The Megatron-style model-parallel unit DeepSpeed takes (`deepspeed.initialize(mpu=...)`):
    with it ZeRO partitions and averages only across the data-parallel group, and the gradient
    norm for clipping sums the sharded parameters across the feature group."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def get_model_parallel_rank(self) -> int:
        return self.mesh.fp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.dims.feature_parallel

    def get_model_parallel_group(self):
        return self.mesh.fp_group

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dims.data_parallel

    def get_data_parallel_group(self):
        return self.mesh.dp_group

    # newer DeepSpeed code asks for the tensor-parallel names
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
