"""Training-step throughput of a dense (relu_l1) and a sparse (topk) SAE against this machine's matmul rate.

    python benchmarks/train_throughput.py [--d-model 576] [--n-features 16384] [--batch 4096] [--repeats 3] [--json]

One process, fp32, the real training step: DeepSpeed engine forward, backward, Adam step with
global-norm clipping (ZeRO-1). The matmul baseline runs the five matrix products of a dense step
(encoder forward, decoder forward, gradient w.r.t. the code, decoder and encoder weight gradients)
with the same shapes; its rate is 10 * batch * d * n_features / its time. FLOP efficiency is that
dense work over a step's time, against the baseline's rate. topk+AuxK marks 10% of the latents dead,
so the AuxK loss is computed too. All variants alternate, `--repeats` times; the best of each is shown.

Each run is timed by the wall clock and by the process's CPU time (all threads). On a machine shared
with other jobs the wall clock also counts the time slices others take; CPU time counts the work
this process did, so the CPU-time efficiency is the steadier figure there (on an idle machine the
two agree). tokens/s is always by the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pipeline.parallel import Mesh, ParallelDims, init_distributed
from pipeline.sae import SAEConfig
from pipeline.train import TrainConfig
from pipeline.train.engine import build_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--n-features", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    B, d, n = a.batch, a.d_model, a.n_features
    dense_flop = 10 * B * d * n

    device = init_distributed()
    mesh = Mesh(ParallelDims(1, 1), device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)

    def engine(arch: str):
        cfg = TrainConfig(sae=SAEConfig(architecture=arch, n_features=n, d_model=d, k=a.k),
                          n_tokens=B * 1000, batch_size=B)
        return build_engine(cfg, mesh.build_sae(cfg.sae, seed=0), mesh, device)

    engines = {"relu_l1": engine("relu_l1"), "topk": engine("topk")}

    def step(arch: str, dead: bool = False) -> None:
        eng = engines[arch]
        if dead:  # 10% of the latents dead: AuxK runs
            eng.module.tokens_since_fired[: n // 10] = eng.module.cfg.dead_tokens
        out = eng(x)
        eng.backward(out.loss)
        eng.step()

    W = torch.randn(n, d, generator=g)
    code = torch.randn(B, n, generator=g).relu_()
    gx = torch.randn(B, d, generator=g)

    def matmuls() -> None:
        x @ W.t()        # encoder forward
        code @ W         # decoder forward
        gx @ W.t()       # gradient w.r.t. the code
        code.t() @ gx    # decoder weight gradient
        code.t() @ x     # encoder weight gradient

    def timed(f) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        f()
        return time.perf_counter() - wall, time.process_time() - cpu

    variants = {"matmul": matmuls, "relu_l1": lambda: step("relu_l1"), "topk": lambda: step("topk"),
                "topk+AuxK": lambda: step("topk", dead=True)}
    for f in variants.values():  # warm-up
        f()
    times = {k: [] for k in variants}
    for _ in range(a.repeats):
        for k, f in variants.items():
            times[k].append(timed(f))
    best = {k: min(t[0] for t in v) for k, v in times.items()}
    cpu = {k: min(t[1] for t in v) for k, v in times.items()}
    rate = dense_flop / best["matmul"]
    rows = {k: {"step_s": best[k], "cpu_s": cpu[k], "tokens_per_s": B / best[k],
                "dense_gflop_per_s": dense_flop / best[k] / 1e9, "flop_efficiency": best["matmul"] / best[k],
                "flop_efficiency_cpu_time": cpu["matmul"] / cpu[k], "vs_relu_l1": best["relu_l1"] / best[k],
                "vs_relu_l1_cpu_time": cpu["relu_l1"] / cpu[k]}
            for k in ("relu_l1", "topk", "topk+AuxK")}
    result = {"d_model": d, "n_features": n, "batch": B, "k": a.k, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "matmul_gflop_per_s": rate / 1e9,
              "matmul_s": best["matmul"], "matmul_cpu_s": cpu["matmul"], "steps": rows,
              "all_times_wall_cpu": times}
    if a.json:
        print(json.dumps(result))
        return
    print(f"d={d}, n_features={n}, batch={B}, k={a.k}, fp32, {torch.get_num_threads()} threads, "
          f"load average {result['load_average']:.1f}")
    print(f"matmul baseline (the 5 products of a dense step): {best['matmul']:.3f} s = {rate / 1e9:.1f} GFLOP/s "
          f"(CPU time {cpu['matmul']:.3f} s)")
    print(f"{'variant':<10} {'step s':>7} {'CPU s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'FLOP eff':>9} "
          f"{'(CPU time)':>10} {'vs relu_l1':>11} {'(CPU time)':>10}")
    for k, r in rows.items():
        print(f"{k:<10} {r['step_s']:>7.3f} {r['cpu_s']:>7.3f} {r['tokens_per_s']:>9,.0f} "
              f"{r['dense_gflop_per_s']:>8.1f} {r['flop_efficiency']:>9.0%} {r['flop_efficiency_cpu_time']:>10.0%} "
              f"{r['vs_relu_l1']:>10.2f}x {r['vs_relu_l1_cpu_time']:>9.2f}x")


if __name__ == "__main__":
    main()
