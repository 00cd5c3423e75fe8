"""Training-step throughput of a dense (relu_l1) and a sparse (topk) SAE against this machine's matmul rate.

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--precision auto|fp32|bf16]
        [--d-model 576] [--n-features 16384] [--batch 4096] [--variants relu_l1,topk,topk+AuxK]
        [--repeats 3] [--iters N] [--json]

One process, the real training step: DeepSpeed engine forward, backward, Adam step with
global-norm clipping (ZeRO-1), in the trainer's precision for the device (`auto`: fp32 on the CPU,
bf16 weights and inputs with fp32 master weights on CUDA; pipeline/train/engine.py). The matmul
baseline runs the five matrix products of a dense step (encoder forward, decoder forward, gradient
w.r.t. the code, decoder and encoder weight gradients) with the same shapes in the same dtype (on
CUDA: cuBLAS bf16 matmuls); its rate is 10 * batch * d * n_features / its time. FLOP utilisation
("flop_efficiency") is that dense work over a step's time, against the baseline's rate.
topk+AuxK marks 10% of the latents dead, so the AuxK loss is computed too; topk-exact is topk with
sae.scan_precision=exact (topk's `auto` scans in bf16 where the device multiplies bf16 natively and
refines the candidates exactly: pipeline/sae/topk.py). All variants
alternate, `--repeats` times; the best of each is shown. Targets (BENCHMARKS.md): on the CPU a
relu_l1 step at >= 80% of the matmul rate, on CUDA (bf16) >= 50%; topk >= 2x relu_l1 at 16,384
latents on both.

On CUDA it also times the sparse decode (topk's decoder: gather-and-sum forward, both gradients;
unit-norm rows) with the Triton kernels (pipeline/sae/triton_kernels.py) against the torch path on
the same tensors; elsewhere that row says "skipped: needs CUDA". CUDA timings synchronize before
and after each timed call, which repeats the step --iters times (default 20 on CUDA, 1 on the CPU:
a GPU step takes milliseconds).

Each run is timed by the wall clock and by the process's CPU time (all threads). On a machine shared
with other jobs the wall clock also counts the time slices others take; CPU time counts the work
this process did, so on the CPU the CPU-time efficiency is the steadier figure (on an idle machine
the two agree; on CUDA only the wall clock means anything). tokens/s is always by the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager

import torch

from pipeline.device import resolve_device, synchronize
from pipeline.parallel import Mesh, ParallelDims, init_distributed
from pipeline.sae import SAEConfig
from pipeline.step import DeepSpeedConfig
from pipeline.train import TrainConfig
from pipeline.train.engine import build_engine, precision

VARIANTS = ("relu_l1", "topk", "topk-exact", "topk+AuxK")
TARGETS = {"cpu": {"flop_efficiency": 0.8, "topk_vs_relu_l1": 2.0},
           "cuda": {"flop_efficiency": 0.5, "topk_vs_relu_l1": 2.0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the trainer's deepspeed.precision (auto: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--n-features", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="steps per timed run (default: 20 on CUDA, 1 on the CPU)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    chosen = [v for v in a.variants.split(",") if v]
    if not chosen or set(chosen) - set(VARIANTS):
        ap.error(f"--variants={a.variants!r}: choose from {', '.join(VARIANTS)}")
    result = measure(a, chosen)
    if a.json:
        print(json.dumps(result))
    else:
        print_table(result)


def measure(a, chosen: list[str]) -> dict:
    B, d, n = a.batch, a.d_model, a.n_features
    dense_flop = 10 * B * d * n
    device = init_distributed(resolve_device(a.device, "--device"))
    iters = a.iters or (20 if device.type == "cuda" else 1)
    mesh = Mesh(ParallelDims(1, 1), device)

    def config(base: str) -> TrainConfig:  # base: a variant without +AuxK
        sae = SAEConfig(architecture=base.removesuffix("-exact"), n_features=n, d_model=d, k=a.k,
                        scan_precision="exact" if base.endswith("-exact") else "auto")
        return TrainConfig(sae=sae, n_tokens=B * 1000, batch_size=B, deepspeed=DeepSpeedConfig(precision=a.precision))

    mode = precision(config("topk"), device)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    engines = {base: build_engine(config(base), mesh.build_sae(config(base).sae, seed=0), mesh, device)
               for base in {v.split("+")[0] for v in chosen}}
    g = torch.Generator().manual_seed(0)

    def tensor(*shape) -> torch.Tensor:  # made on the CPU (one generator, same values anywhere), placed once
        return torch.randn(*shape, generator=g).to(device, dtype)

    x, W, code, gx = tensor(B, d), tensor(n, d), tensor(B, n).relu_(), tensor(B, d)

    def step(base: str, dead: bool = False) -> None:
        eng = engines[base]
        if dead:  # 10% of the latents dead: AuxK runs
            eng.module.tokens_since_fired[: n // 10] = eng.module.dead_tokens
        out = eng(x)
        eng.backward(out.loss)
        eng.step()

    def matmuls() -> None:
        x @ W.t()        # encoder forward
        code @ W         # decoder forward
        gx @ W.t()       # gradient w.r.t. the code
        code.t() @ gx    # decoder weight gradient
        code.t() @ x     # encoder weight gradient

    timed = timer(device, iters)
    variants = {"matmul": matmuls, **{v: (lambda v=v: step(v.split("+")[0], dead=v.endswith("+AuxK"))) for v in chosen}}
    for f in variants.values():  # warm-up (and on CUDA: kernel compilation, cuBLAS's choice of algorithm)
        timed(f)
    times = {k: [] for k in variants}
    for _ in range(a.repeats):
        for k, f in variants.items():
            times[k].append(timed(f))
    best = {k: min(t[0] for t in v) for k, v in times.items()}
    cpu = {k: min(t[1] for t in v) for k, v in times.items()}
    rate = dense_flop / best["matmul"]
    rows = {k: {"step_s": best[k], "cpu_s": cpu[k], "tokens_per_s": B / best[k],
                "dense_gflop_per_s": dense_flop / best[k] / 1e9, "flop_efficiency": best["matmul"] / best[k],
                "flop_efficiency_cpu_time": cpu["matmul"] / cpu[k]} for k in chosen}
    if "relu_l1" in rows:
        for k, r in rows.items():
            r["vs_relu_l1"], r["vs_relu_l1_cpu_time"] = best["relu_l1"] / best[k], cpu["relu_l1"] / cpu[k]
    result = {"device": describe(device), "precision": mode, "d_model": d, "n_features": n, "batch": B, "k": a.k,
              "iters_per_timing": iters, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
              "matmul_gflop_per_s": rate / 1e9, "matmul_s": best["matmul"], "matmul_cpu_s": cpu["matmul"],
              "steps": rows, "sparse_decode": sparse_decode_times(device, dtype, B, d, n, a.k, a.repeats, timed),
              "all_times_wall_cpu": times}
    result["targets"] = targets(result, device.type)
    return result


def timer(device: torch.device, iters: int):
    """(wall s, CPU s) per call of f, f run `iters` times; on CUDA after the queued work is done."""
    def timed(f) -> tuple[float, float]:
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            f()
        synchronize(device)
        return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters
    return timed


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu: {torch.get_num_threads()} threads (torch {torch.__version__})"


def sparse_decode_times(device, dtype, B: int, d: int, n: int, k: int, repeats: int, timed) -> dict:
    """topk's decode, forward and backward, with the Triton kernels and with the torch path."""
    from pipeline.sae import sparse
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    if sparse.triton_for(torch.zeros(1, device=device)) is None:
        return {"skipped": "needs triton (pip install triton)"}
    g = torch.Generator().manual_seed(1)
    W = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    vals = torch.rand(B, k, generator=g).to(device, dtype).requires_grad_()
    idx = torch.randint(n, (B, k), generator=g).to(device)
    grad = torch.randn(B, d, generator=g).to(device, dtype)

    def decode() -> None:
        sparse.sparse_decode(vals, idx, W, unit_norm=True).backward(grad)

    def torch_decode() -> None:
        with no_triton(sparse):
            decode()

    paths = {"triton": decode, "torch": torch_decode}
    for f in paths.values():  # warm-up: Triton compiles its kernels
        timed(f)
    best = {name: min(timed(f)[0] for _ in range(repeats)) for name, f in paths.items()}
    return {"shape": {"batch": B, "k": k, "n_features": n, "d_model": d, "dtype": str(dtype).removeprefix("torch.")},
            "triton_s": best["triton"], "torch_s": best["torch"], "triton_speedup": best["torch"] / best["triton"]}


@contextmanager
def no_triton(sparse):
    """The torch path on CUDA tensors: triton_for answers None, as where triton is not installed."""
    original = sparse.triton_for
    sparse.triton_for = lambda *tensors: None
    try:
        yield
    finally:
        sparse.triton_for = original


def targets(result: dict, device_type: str) -> dict:
    """Each target of this device that the run measured: its value, the target, and whether met."""
    steps, out = result["steps"], {}
    for key, target in TARGETS[device_type].items():
        if key == "flop_efficiency" and "relu_l1" in steps:
            value = steps["relu_l1"]["flop_efficiency"]
        elif key == "topk_vs_relu_l1" and {"relu_l1", "topk"} <= set(steps):
            value = steps["topk"]["vs_relu_l1"]
        else:
            continue
        out[key] = {"value": value, "target": target, "met": value >= target}
    return out


def print_table(r: dict) -> None:
    print(f"{r['device']}, d={r['d_model']}, n_features={r['n_features']}, batch={r['batch']}, k={r['k']}, "
          f"{r['precision']}, load average {r['load_average']:.1f}, {r['iters_per_timing']} step(s) per timing")
    print(f"matmul baseline (the 5 products of a dense step): {r['matmul_s']:.4f} s = {r['matmul_gflop_per_s']:.1f} "
          f"GFLOP/s (CPU time {r['matmul_cpu_s']:.4f} s)")
    print(f"{'variant':<10} {'step s':>8} {'CPU s':>8} {'tokens/s':>11} {'GFLOP/s':>9} {'FLOP eff':>9} "
          f"{'(CPU time)':>10} {'vs relu_l1':>11} {'(CPU time)':>10}")
    for k, s in r["steps"].items():
        vs = (f"{s['vs_relu_l1']:>10.2f}x {s['vs_relu_l1_cpu_time']:>9.2f}x" if "vs_relu_l1" in s
              else f"{'-':>11} {'-':>10}")
        print(f"{k:<10} {s['step_s']:>8.4f} {s['cpu_s']:>8.4f} {s['tokens_per_s']:>11,.0f} "
              f"{s['dense_gflop_per_s']:>9.1f} {s['flop_efficiency']:>9.0%} {s['flop_efficiency_cpu_time']:>10.0%} {vs}")
    dec = r["sparse_decode"]
    if "skipped" in dec:
        print(f"sparse decode, Triton vs torch: skipped: {dec['skipped']}")
    else:
        print(f"sparse decode (forward + backward), Triton {dec['triton_s'] * 1e3:.3f} ms, torch "
              f"{dec['torch_s'] * 1e3:.3f} ms: {dec['triton_speedup']:.2f}x")
    for key, t in r["targets"].items():
        print(f"target {key}: {t['value']:.2f} (>= {t['target']}): {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
