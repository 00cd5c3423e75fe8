"""Step time and peak memory against n_features, dense vs tiled/sparse, beside the planner's prediction.

    python benchmarks/train_scaling.py [--sizes 16384,65536,262144,524288] [--batch 1024] [--tile 8192] [--json]
    python benchmarks/train_scaling.py --trainer [--n-features 262144] [--nproc 2] [--batch 4096] [--tiles 0,8192]

Default mode: one fresh process per (variant, n_features) point, so that each peak is its own. A
point is one SAE module in one process, fp32, with torch.optim.Adam (fused): a warm-up step, then
`--steps` timed steps (forward + backward, and the optimizer step, timed apart). Peak memory is the
process's peak RSS (getrusage) minus its RSS after the imports and the input batch; the planner's
prediction is pipeline.plan.rank_memory for that configuration (ZeRO-0: plain Adam, no master copy).
(The planner's runtime term is a bare process's here, 0.2 GiB; AuxK does not run, nothing being dead.)
Times are the process's CPU time (all threads), steadier than the wall clock on a shared machine;
tokens/s is by the wall clock. Variants:

    relu_l1          the untiled step: autograd keeps the [batch, n_features] code for backward
    relu_l1 tiled    feature_tile=--tile: each tile recomputed in backward, nothing [batch, n] kept
    topk dense       reference: the obvious dense step (dense code [batch, n], dense decode)
    topk sparse      the sparse step as trained (one [batch, n] pre-activation tile, no grad)
    topk tiled       the sparse step with feature_tile=--tile: running top-k, no [batch, n] matrix

Points the planner says need more than --max-gib are not run (the machine is shared), or run forward
+ backward only where that fits but Adam's state does not (marked; such a point's peak is compared
with the planner's weights, gradients and forward/backward transients). The encoder
matmul's time (the tiled pre-activations alone) is measured after each point; the growth table
compares how the rest of the sparse step (forward + backward minus encoder, and the optimizer step)
grows with n_features against n_features itself.

--trainer: the real trainer (`python -m torch.distributed.run --nproc-per-node=2 -m pipeline.train`
with feature_parallel=2, ZeRO-1 (--zero), fp32 weights, Adam state in --state-dtype, gloo) on a synthetic d=576 store, untiled and tiled (--tiles);
each rank records its peak RSS over the training steps (before the final checkpoint) minus its RSS
after the imports, against the planner's per-rank memory plus the loader's shuffle buffer (host
memory on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (architecture, tiled, dense reference)
    "relu_l1": ("relu_l1", False, False), "relu_l1 tiled": ("relu_l1", True, False),
    "topk dense": ("topk", False, True), "topk sparse": ("topk", False, False), "topk tiled": ("topk", True, False)}


def rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BARE_RUNTIME_GB = 0.2
"""Runtime memory of a bare torch process beyond its imports (thread pools, allocator), measured
here; the planner's default (0.5 GiB) is a trainer rank's: DeepSpeed, gloo, loader threads."""


def plan_bytes(arch: str, n: int, d: int, k: int, batch: int, tile: int, zero: int = 0, fp: int = 1,
               runtime_gb: float = BARE_RUNTIME_GB, k_aux: int = 0, state_dtype: str = "fp32"):
    """The planner's per-rank memory for what a point runs (AuxK off: no latent is dead in a few
    steps, unless a run makes them so, as --trainer does)."""
    from pipeline.plan import PlanConfig, rank_memory
    from pipeline.sae import SAEConfig
    from pipeline.step import DeepSpeedConfig, OptimConfig
    cfg = PlanConfig(sae=SAEConfig(d_model=d, n_features=n, architecture=arch, k=k, feature_tile=tile, k_aux=k_aux),
                     deepspeed=DeepSpeedConfig(zero_stage=zero, precision="fp32"),
                     optim=OptimConfig(state_dtype=state_dtype), batch_size=batch, runtime_gb=runtime_gb)
    return rank_memory(cfg, 1, fp)


# ---------------------------------------------------------------- one point, in its own process

def point(variant: str, n: int, d: int, k: int, batch: int, tile: int, steps: int, optimizer: bool = True) -> dict:
    import torch

    from pipeline.sae import SAEConfig, create
    from pipeline.sae.sparse import dense_decode, dense_gather_linear
    from pipeline.sae.tiled import tiles

    arch, tiled, dense = VARIANTS[variant]
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
    base = rss()
    sae = create(SAEConfig(architecture=arch, n_features=n, d_model=d, k=k, feature_tile=tile if tiled else 0))
    sae.reset_parameters(0, mean=x.mean(0))
    if dense:  # the obvious dense topk step, for reference: dense code, dense decode and gradients
        sae.code = lambda x, b_dec, idx, pre, keep: torch.where(
            keep, dense_gather_linear(x, sae.W_enc, sae.b_enc, b_dec, idx).relu(), 0.0)
        sae.decode = lambda vals, idx: dense_decode(vals, idx, sae.W_dec, unit_norm=True)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True) if optimizer else None
    fb, st = [], []
    fb, st, wall = [], [], []
    for i in range(steps + 1):  # the first step is the warm-up (Adam allocates its state there)
        w0, t0 = time.perf_counter(), time.process_time()
        sae(x).loss.backward()
        t1 = time.process_time()
        if opt is not None:
            opt.step()
        sae.zero_grad(set_to_none=True)
        t2 = time.process_time()
        if i:
            fb.append(t1 - t0), st.append(t2 - t1), wall.append(time.perf_counter() - w0)
    peak = peak_rss() - base
    encs = []
    with torch.no_grad():  # the encoder matmul alone, tile by tile (never [batch, n] at once)
        for _ in range(steps):
            t0 = time.process_time()
            for t in tiles(n, min(n, 8192)):
                torch.addmm(sae.b_enc[t], x, sae.W_enc[t].t())
            encs.append(time.process_time() - t0)
    fb_s, st_s = min(fb), (min(st) if optimizer else None)
    return {"variant": variant, "n_features": n, "fwd_bwd_s": fb_s, "optim_s": st_s,
            "step_s": fb_s + st_s if optimizer else None, "encoder_s": min(encs), "wall_s": min(wall),
            "tokens_per_s": batch / min(wall), "peak_bytes": peak, "optimizer": optimizer}


def run_point(a, variant: str, n: int, optimizer: bool) -> dict:
    cmd = [sys.executable, __file__, "--point", variant, "--n-features", str(n), "--d-model", str(a.d_model),
           "--k", str(a.k), "--batch", str(a.batch), "--tile", str(a.tile), "--steps", str(a.steps)]
    cmd += [] if optimizer else ["--no-optimizer"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        return {"variant": variant, "n_features": n, "error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def scaling(a) -> dict:
    import torch
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    for n in sizes:
        for variant, (arch, tiled, dense) in VARIANTS.items():
            mem = plan_bytes(arch, n, a.d_model, a.k, a.batch, a.tile if tiled else 0)
            # without Adam: the weights, and the larger of forward and gradients + backward
            bare = mem.weights + mem.buffers + mem.runtime + max(mem.forward, mem.gradients + mem.backward)
            # the dense topk reference: about the relu_l1 step's memory (no prediction of its own)
            proxy = plan_bytes("relu_l1", n, a.d_model, a.k, a.batch, 0).total
            need, optimizer = (proxy if dense else mem.total), True
            if need > a.max_gib * 2**30 and not dense and bare <= a.max_gib * 2**30:
                need, optimizer = bare, False  # forward + backward only: Adam's state does not fit here
            row = {"variant": variant, "n_features": n, "plan_bytes": None if dense else need}
            if need > a.max_gib * 2**30:
                rows.append({**row, "skipped": f"planner {need / 2**30:.1f} GiB > --max-gib {a.max_gib}"})
                continue
            if arch == "relu_l1" and n > a.relu_max or dense and n > a.relu_max:
                rows.append({**row, "skipped": f"n > --relu-max {a.relu_max} (time)"})
                continue
            r = {**run_point(a, variant, n, optimizer), **row}
            if row["plan_bytes"] and "peak_bytes" in r:
                r["measured_over_plan"] = r["peak_bytes"] / row["plan_bytes"]
            rows.append(r)
            if not a.json:
                print(f"  {variant:<14} {n:>9,}: {r.get('fwd_bwd_s', float('nan')):.2f} s forward+backward",
                      file=sys.stderr, flush=True)
    growth = {}
    for variant in ("topk sparse", "topk tiled", "relu_l1", "relu_l1 tiled"):
        pts = [r for r in rows if r["variant"] == variant and "fwd_bwd_s" in r]
        if len(pts) >= 2:
            lo, hi = pts[0], pts[-1]
            with_adam = [r for r in pts if r["optimizer"]]
            growth[variant] = {
                "from": lo["n_features"], "to": hi["n_features"], "n_features_x": hi["n_features"] / lo["n_features"],
                "fwd_bwd_x": hi["fwd_bwd_s"] / lo["fwd_bwd_s"], "encoder_x": hi["encoder_s"] / lo["encoder_s"],
                "fwd_bwd_beyond_encoder_x": max(hi["fwd_bwd_s"] - hi["encoder_s"], 1e-9) /
                max(lo["fwd_bwd_s"] - lo["encoder_s"], 1e-9),
                "optimizer_x": with_adam[-1]["optim_s"] / lo["optim_s"] if len(with_adam) >= 2 else None,
                "optimizer_to": with_adam[-1]["n_features"] if with_adam else None}
    return {"mode": "scaling", "d_model": a.d_model, "batch": a.batch, "k": a.k, "tile": a.tile, "steps": a.steps,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "points": rows, "growth": growth}


def print_scaling(res: dict) -> None:
    gib = 2**30
    print(f"d={res['d_model']}, batch={res['batch']}, k={res['k']}, tile={res['tile']}, fp32, one process, "
          f"{res['threads']} threads, fused Adam, best of {res['steps']} steps; load average {res['load_average']:.1f}")
    print("times: CPU seconds of the process (2 threads), best of the timed steps; tokens/s: wall clock")
    print(f"{'variant':<14} {'n_features':>10} {'step s':>7} {'fwd+bwd':>8} {'encoder':>8} {'Adam':>6} "
          f"{'tokens/s':>9} {'peak GiB':>9} {'plan GiB':>9} {'peak/plan':>9}")
    dash = lambda w: f"{'-':>{w}}"  # noqa: E731
    for r in res["points"]:
        if "fwd_bwd_s" not in r:
            print(f"{r['variant']:<14} {r['n_features']:>10,} not run: {r.get('skipped') or r.get('error')}")
            continue
        plan = f"{r['plan_bytes'] / gib:>9.2f}" if r.get("plan_bytes") else dash(9)
        ratio = f"{r['measured_over_plan']:>9.2f}" if "measured_over_plan" in r else dash(9)
        step = f"{r['step_s']:>7.2f}" if r["step_s"] else dash(7)
        adam = f"{r['optim_s']:>6.2f}" if r["optim_s"] is not None else f"{'none':>6}"
        tps = f"{r['tokens_per_s']:>9,.0f}" if r["optimizer"] else f"{'(' + format(r['tokens_per_s'], ',.0f') + ')':>9}"
        print(f"{r['variant']:<14} {r['n_features']:>10,} {step} {r['fwd_bwd_s']:>8.2f} {r['encoder_s']:>8.2f} "
              f"{adam} {tps} {r['peak_bytes'] / gib:>9.2f} {plan} {ratio}")
    print("Adam 'none': forward + backward only (Adam's state does not fit beside the others' jobs); "
          "tokens/s in parentheses then counts forward + backward only")
    for variant, g in res["growth"].items():
        opt = (f", optimizer step x{g['optimizer_x']:.1f} (to {g['optimizer_to']:,})" if g["optimizer_x"] else "")
        print(f"{variant}: n_features x{g['n_features_x']:.0f} ({g['from']:,} -> {g['to']:,}): forward+backward "
              f"x{g['fwd_bwd_x']:.1f}, encoder matmul x{g['encoder_x']:.1f}, forward+backward beyond the encoder "
              f"x{g['fwd_bwd_beyond_encoder_x']:.1f}{opt}")


# ---------------------------------------------------------------- the real trainer, 2 ranks

def store(url: str, d: int, rows: int = 32768) -> str:
    """A committed synthetic store (sparse combinations of 1024 directions plus a mean), cached."""
    import torch

    from pipeline.store import ActivationStore, ActivationStoreWriter, StoreLayout, commit
    try:
        if ActivationStore.open(url).d_model == d:
            return url
    except Exception:  # not there yet (or from an older run): write it
        pass
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(1024, d, generator=g)
    per_ctx = 128
    layout = StoreLayout(("blocks.0",), d, "float32", rows // per_ctx, per_ctx, 64, 32)
    w = ActivationStoreWriter(url, layout, {"fingerprint": f"scaling-{d}", "model": {"id": "synthetic"}})
    for shard in range(layout.n_shards):
        span = layout.shard_contexts_range(shard)
        n = len(span) * per_ctx
        codes = torch.rand(n, 1024, generator=g) * (torch.rand(n, 1024, generator=g) < 0.02)
        x = codes @ dirs + torch.randn(d, generator=torch.Generator().manual_seed(1))
        w.begin_shard(shard)
        w.append({"blocks.0": x}, torch.zeros(n, dtype=torch.int32), torch.arange(span.start, span.stop).repeat_interleave(per_ctx),
                 torch.arange(n) % per_ctx)
        w.end_shard(len(span))
    w.close()
    commit(w)
    return url


def rank_worker(out: str, overrides: list[str]) -> None:
    """Inside torchrun: the real `pipeline.train` entry point, with its peak RSS recorded before the
    final checkpoint (the training steps) and after the engine is built (the static state)."""
    import pipeline.train.loop as loop
    from pipeline.train.__main__ import main
    base, marks = rss(), {}

    def engine(*args, **kw):
        e = build(*args, **kw)
        marks["after_engine"] = rss() - base
        return e
    build, loop.build_engine = loop.build_engine, engine
    save = loop.Checkpoints.save

    def first_save(self, *args, **kw):
        marks.setdefault("steps_peak", peak_rss() - base)
        return save(self, *args, **kw)
    loop.Checkpoints.save = first_save
    sys.argv = [sys.argv[0], *overrides]
    try:
        main()
    finally:
        marks["peak_incl_checkpoint"] = peak_rss() - base
        Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(json.dumps(marks))


def trainer(a) -> dict:
    from pipeline.plan import PlanConfig
    from pipeline.sae import SAEConfig
    runs = REPO / "runs" / "bench" / "scaling"
    url = store(str(runs / f"store-d{a.d_model}"), a.d_model)
    rows = []
    for tile in (int(t) for t in a.tiles.split(",")):
        out = runs / f"{a.arch}-{a.n_features}-tile{tile}-zero{a.zero}-{a.state_dtype}"
        mem = plan_bytes(a.arch, a.n_features, a.d_model, a.k, a.batch, tile, zero=a.zero, fp=a.nproc,
                         runtime_gb=PlanConfig.runtime_gb, k_aux=SAEConfig.k_aux,  # AuxK on from step 2
                         state_dtype=a.state_dtype)
        need, free = a.nproc * mem.total, mem_available()
        if need > free - a.margin_gib * 2**30:  # the machine is shared: never take the others' memory
            rows.append({"tile": tile, "error": f"not run: the planner says {a.nproc} ranks need {need / 2**30:.1f} "
                         f"GiB, {free / 2**30:.1f} GiB is available (margin {a.margin_gib} GiB)"})
            continue
        subprocess.run(["rm", "-rf", str(out)], check=True)
        steps = a.steps + 1
        overrides = [f"data.url={url}", f"sae={a.arch}", f"sae.n_features={a.n_features}", f"sae.k={a.k}",
                     f"sae.feature_tile={tile}", f"batch_size={a.batch}", f"n_tokens={a.batch * steps}",
                     f"parallel.feature_parallel={a.nproc}", "parallel.data_parallel=1", f"deepspeed.zero_stage={a.zero}",
                     f"optim.state_dtype={a.state_dtype}",
                     f"data.shuffle_buffer={a.shuffle}", f"sae.dead_tokens={a.dead_tokens or a.batch}", "log_every=1", "checkpoint_every=0", "export=false",
                     "progress=false", f"out_dir={out}", "hydra.output_subdir=null", "hydra/job_logging=none",
                     "hydra/hydra_logging=none", f"hydra.run.dir={out}/hydra"]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={a.nproc}", __file__, "--rank-worker", str(out / "rss"), "--", *overrides],
                           cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            rows.append({"tile": tile, "error": p.stderr[-3000:]})
            continue
        ranks = [json.loads((out / f"rss.{r}").read_text()) for r in range(a.nproc)]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(m["tokens_per_s"] for m in metrics[1:]) or [metrics[-1]["tokens_per_s"]]
        loader = a.shuffle * a.d_model * 4  # the loader's shuffle buffer: host memory, here the same memory
        predicted = mem.total + loader
        measured = max(r["steps_peak"] for r in ranks)
        rows.append({"tile": tile, "ranks": ranks, "measured_peak_bytes": measured, "plan_bytes": mem.total,
                     "plan": vars(mem), "loader_buffer_bytes": loader, "predicted_bytes": predicted,
                     "measured_over_predicted": measured / predicted, "within_15pct": abs(measured / predicted - 1) <= 0.15,
                     "tokens_per_s": tps[len(tps) // 2], "steps": steps, "wall_s": wall})
    return {"mode": "trainer", "arch": a.arch, "d_model": a.d_model, "n_features": a.n_features, "nproc": a.nproc,
            "zero_stage": a.zero, "state_dtype": a.state_dtype,
            "batch": a.batch, "k": a.k, "threads_per_rank": a.threads, "load_average": os.getloadavg()[0], "runs": rows}


def print_trainer(res: dict) -> None:
    gib = 2**30
    print(f"real trainer: {res['arch']}, d={res['d_model']}, n_features={res['n_features']:,}, "
          f"{res['nproc']} ranks (feature_parallel), ZeRO-{res['zero_stage']}, fp32 weights, {res['state_dtype']} "
          f"Adam state, batch {res['batch']}, "
          f"{res['threads_per_rank']} thread(s) per rank; load average {res['load_average']:.1f}")
    print(f"{'tile':>6} {'measured GiB/rank':>18} {'planner GiB':>12} {'+ loader':>9} {'measured/pred':>14} "
          f"{'within 15%':>10} {'tokens/s':>9}")
    for r in res["runs"]:
        if "error" in r:
            print(f"{r['tile']:>6} {r['error'][-500:]}")
            continue
        print(f"{r['tile']:>6} {r['measured_peak_bytes'] / gib:>18.2f} {r['plan_bytes'] / gib:>12.2f} "
              f"{r['loader_buffer_bytes'] / gib:>9.2f} {r['measured_over_predicted']:>14.2f} "
              f"{'yes' if r['within_15pct'] else 'NO':>10} {r['tokens_per_s']:>9,.0f}")
        print("       planner parts (GiB): " + ", ".join(f"{k} {v / gib:.2f}" for k, v in r["plan"].items()))


def main() -> None:
    if "--rank-worker" in sys.argv:  # inside torchrun: everything after "--" goes to Hydra
        i = sys.argv.index("--")
        return rank_worker(sys.argv[sys.argv.index("--rank-worker") + 1], sys.argv[i + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,65536,262144,524288")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=0, help="tokens per step (default: 1024; --trainer: 4096)")
    ap.add_argument("--tile", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-gib", type=float, default=8.0)
    ap.add_argument("--relu-max", type=int, default=262144, help="largest relu_l1 point (its steps are slow)")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    ap.add_argument("--no-optimizer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-features", type=int, default=262144)
    ap.add_argument("--trainer", action="store_true")
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="--trainer: threads per rank")
    ap.add_argument("--zero", type=int, default=1, help="--trainer: deepspeed.zero_stage")
    ap.add_argument("--state-dtype", default="fp32", help="--trainer: optim.state_dtype (fp32, fp8, int8)")
    ap.add_argument("--shuffle", type=int, default=8192, help="--trainer: the loader's shuffle buffer (rows)")
    ap.add_argument("--tiles", default="0,8192", help="--trainer: feature tiles to run (0: untiled)")
    ap.add_argument("--margin-gib", type=float, default=3.0,
                    help="--trainer: memory left to others: run only if the planner's need fits MemAvailable - this")
    ap.add_argument("--dead-tokens", type=int, default=0,
                    help="--trainer: sae.dead_tokens (default: one batch, so AuxK runs from the second step: "
                         "the planner's worst case)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.batch = a.batch or (4096 if a.trainer else 1024)
    if a.point:
        print(json.dumps(point(a.point, a.n_features, a.d_model, a.k, a.batch, a.tile, a.steps, not a.no_optimizer)))
        return
    res = trainer(a) if a.trainer else scaling(a)
    if a.json:
        print(json.dumps(res))
    else:
        (print_trainer if a.trainer else print_scaling)(res)


if __name__ == "__main__":
    main()
