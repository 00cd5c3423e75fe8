"""The device check's steps, resolved: each one's command, its environment and its time budget.

The order puts the figures first (each benchmark a minute or less on one GPU) and the GPU-marked
tests last, where the rest of the deadline goes: a check cut short still has its numbers, and the
tests that did not run are named in the summary."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 480  # the 8 minutes, install included
# the compiled Triton kernels, never the interpreter a developer's shell may have switched on
GPU_ENV = {"TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    argv: list[str]
    budget_s: int
    env: dict[str, str] = field(default_factory=dict)


def makefile_torch_spec() -> str:
    """The torch the Makefile pins (its TORCH_SPEC default): declared there once."""
    m = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    if m is None:
        raise SystemExit("gpu_check: the Makefile declares no `TORCH_SPEC ?= ...`; pass --torch-spec")
    return m.group(1).strip()


def plan(venv: Path, torch_spec: str, out: Path) -> list[Step]:
    py = str(venv / "bin" / "python")
    bench = ROOT / "benchmarks"
    return [
        Step("setup", "the package, its dev extras (pytest, triton) and the embedded model into the venv, with "
             "this torch (on Linux the registry's torch wheels are CUDA builds)",
             ["make", "-C", str(ROOT), "setup", f"VENV={venv}", f"TORCH_SPEC={torch_spec}"], 240),
        Step("probe", "the card, and that torch is a CUDA build that sees it",
             [py, str(Path(__file__).with_name("probe.py"))], 60, GPU_ENV),
        Step("train-16384", "dense bf16 step vs cuBLAS bf16 matmuls of its shapes, topk vs relu_l1, Triton vs "
             "torch sparse decode, at 16,384 latents",
             [py, str(bench / "train_throughput.py"), "--device", "cuda", "--n-features", "16384", "--json"], 90,
             GPU_ENV),
        Step("train-65536", "the topk step's rows/s at 65,536 latents (what the loader must feed)",
             [py, str(bench / "train_throughput.py"), "--device", "cuda", "--n-features", "65536", "--variants",
              "topk", "--json"], 60, GPU_ENV),
        Step("cache", "the caching stage vs the forward pass, SmolLM2-135M in bf16 on the GPU",
             [py, str(bench / "cache_throughput.py"), "--device", "cuda", "--json"], 90, GPU_ENV),
        Step("loader", "loader rows/s per CPU core into the GPU (local store), and the topk step's rows/s at "
             "4,096 latents measured in the same run",
             [py, str(bench / "loader_throughput.py"), "--device", "cuda", "--rows", "100000", "--repeats", "1",
              "--no-s3", "--no-broadcast", "--trainer-n-features", "4096", "--json"], 90, GPU_ENV),
        Step("gpu-tests", "the tests marked gpu: Triton kernels vs the torch reference on CUDA, bf16 layouts vs "
             "one process with 2 processes on the GPU (nccl with a GPU each, else gloo)",
             [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'gpu-tests.xml'}",
              str(ROOT / "tests")], 240, GPU_ENV),
    ]
