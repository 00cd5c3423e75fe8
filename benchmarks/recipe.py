"""Training recipes side by side on one store: held-out FVU, L0, dead fraction and steady tokens/s.

    python benchmarks/recipe.py --store runs/l15-train --heldout runs/l15-test \
        [--widths 4096,16384] [--budgets 400000,2000000] [--k 32] [--batch 4096] [--json]

Trainers, each on the same training rows (the store, read by our loader with one seed: the same rows
in the same order for every trainer) and scored on the same held-out rows by one function:
  - ours: `python -m pipeline.train` with the default recipe (nothing but sizes set);
  - ours-lr5e-5, ours-lr4e-4: our previous default learning rate and the README's old example;
  - ours-v2: recipe v2's rate, from the width alone (2e-3 x sqrt(16384 / n), whatever the budget);
  - ours-v3: recipe v3, the defaults before v4 (Adam beta1 0.9, the exact fp32 candidate scan);
  - ours-exact: the default recipe with sae.scan_precision=exact (the encoder's candidate scan in
    fp32 also where the CPU multiplies bf16 natively; the default then scans in bf16 and refines);
  - sparsify: EleutherAI's SparseCoder (PyPI eai-sparsify, installed into this venv if absent) with
    its own default optimizer (sign-SGD under schedule-free, lr 5e-3 / sqrt(n / 2^14)), its b_dec
    initialisation (the first batch's mean), unit-norm decoder and parallel-gradient removal, fed
    the raw rows in the loader's order, as its trainer does with activations it computes itself;
  - saelens (when .venv-saelens exists, `make setup-saelens`): SAELens's SAETrainer and TopK SAE with
    their defaults (Adam lr 3e-4, constant), fed the same rows through a pipe (saelens_worker.py).
Held-out metrics (every trainer, the same code): FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 over
the first --heldout-tokens rows of --heldout with our exclusion rules (position 0 and rows beyond
8x the median norm left out, as in training); L0 = mean active latents; dead = latents that fire on
none of those rows. tokens/s: ours from the trainer's metrics.jsonl (median of the logged windows
after the first tenth of the steps), sparsify timed the same way around its steps, both with all
of this machine's threads; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from heldout_score import score
from pipeline.heldout import EXPORT_DIR, METRICS_LOG_FILE
from pipeline.sae import load
from pipeline.store import ActivationLoader
from pipeline.train import recipe

EXCLUDE = {"exclude_positions_below": 1, "exclude_norm_factor": 8.0}  # the trainer's defaults
SAELENS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-saelens" / "bin" / "python"  # make setup-saelens
OURS = {"ours": lambda n: [], "ours-lr5e-5": lambda n: ["optim.lr=5e-5"], "ours-lr4e-4": lambda n: ["optim.lr=4e-4"],
        # recipe v2: the rate from the width alone (no budget factor)
        "ours-v2": lambda n: [f"optim.lr={recipe.LR_AT_16K * (2 ** 14 / n) ** 0.5:g}"],
        "ours-exact": lambda n: ["sae.scan_precision=exact"],  # no bf16 candidate scan (pipeline/sae/topk.py)
        "ours-v3": lambda n: ["sae.scan_precision=exact", "optim.betas=[0.9,0.999]"]}  # the defaults before v4


def heldout_rows(url: str, n: int) -> torch.Tensor:
    rows = torch.cat(list(ActivationLoader(url, 4096, seed=0, epochs=1, **EXCLUDE)))
    return rows[:n].float()


def train_ours(name: str, extra: list[str], a, n: int, budget: int, x_test: torch.Tensor, tmp: Path) -> dict:
    out = tmp / f"{name}-{n}-{budget}"
    cmd = [sys.executable, "-m", "pipeline.train", f"data.url={a.store}", f"sae.n_features={n}", f"sae.k={a.k}",
           f"n_tokens={budget}", f"batch_size={a.batch}", f"out_dir={out}", "progress=false", "log_every=10", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    sae = load(out / EXPORT_DIR)
    cfg = json.loads((out / EXPORT_DIR / "cfg.json").read_text())

    def run(part):
        code = sae.encode(part)
        return sae(part).x_hat, code.indices[code.values > 0]
    logged = [json.loads(line) for line in (out / METRICS_LOG_FILE).read_text().splitlines() if line.strip()]
    steady = [r["tokens_per_s"] for r in logged[max(1, len(logged) // 10):]]
    return {**score(run, x_test, n), "tokens_per_s": statistics.median(steady),
            "lr": cfg["training"]["optim"]["lr"]}


def ensure_sparsify() -> None:
    if importlib.util.find_spec("sparsify") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "eai-sparsify",
                        f"torch=={torch.__version__.split('+')[0]}"], check=True)


def train_sparsify(a, n: int, budget: int, x_test: torch.Tensor) -> dict:
    if not torch.cuda.is_available():  # its Triton decoder needs a GPU; its eager one is what runs on CPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    loader = ActivationLoader(a.store, a.batch, seed=0, epochs=None, drop_last=True, **EXCLUDE)
    sae = SparseCoder(x_test.shape[1], SparseCoderConfig(num_latents=n, k=a.k), "cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (n / 2 ** 14) ** 0.5}]),
                              momentum=0.95)
    opt.train()
    steps, times = budget // a.batch, []
    for step, x in zip(range(steps), loader):
        t = time.perf_counter()
        x = x.float()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    opt.eval()  # schedule-free: evaluate at the averaged weights, as sparsify saves them
    sae.set_decoder_norm_to_unit_norm()

    def run(part):
        out = sae(part)
        return out.sae_out, out.latent_indices
    steady = times[max(1, len(times) // 10):]
    return {**score(run, x_test, n), "tokens_per_s": a.batch / statistics.median(steady), "lr": opt.param_groups[0]["lr"]}


def train_saelens(a, n: int, budget: int, x_test: torch.Tensor) -> dict:
    """SAELens's own trainer and defaults (benchmarks/saelens_worker.py, in .venv-saelens), fed the
    held-out rows and then the training rows in the loader's order through a pipe."""
    steps = budget // a.batch
    head = {"d": x_test.shape[1], "n": n, "k": a.k, "batch": a.batch, "steps": steps, "n_test": len(x_test)}
    worker = subprocess.Popen([str(SAELENS_PYTHON), str(Path(__file__).with_name("saelens_worker.py"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"})
    worker.stdin.write(json.dumps(head).encode() + b"\n")
    worker.stdin.write(x_test.contiguous().numpy().tobytes())
    loader = ActivationLoader(a.store, a.batch, seed=0, epochs=None, drop_last=True, **EXCLUDE)
    for _, x in zip(range(steps), loader):
        worker.stdin.write(x.float().contiguous().numpy().tobytes())
    worker.stdin.close()
    out = worker.stdout.read().decode().strip().splitlines()
    if worker.wait() != 0:
        raise RuntimeError(f"the SAELens worker failed (exit {worker.returncode})")
    return json.loads(out[-1])


TRAINERS = {"sparsify": train_sparsify, "saelens": train_saelens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--heldout-tokens", type=int, default=50_000)
    ap.add_argument("--widths", default="4096,16384")
    ap.add_argument("--budgets", default="400000,2000000")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--trainers", default="ours,ours-lr5e-5,ours-lr4e-4,sparsify" + ",saelens" * SAELENS_PYTHON.exists())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    trainers = a.trainers.split(",")
    if "sparsify" in trainers:
        ensure_sparsify()
    x_test = heldout_rows(a.heldout, a.heldout_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, a.widths.split(",")):
            for budget in map(int, a.budgets.split(",")):
                for name in trainers:
                    r = (TRAINERS[name](a, n, budget, x_test) if name in TRAINERS
                         else train_ours(name, OURS[name](n), a, n, budget, x_test, Path(tmp)))
                    rows.append({"trainer": name, "n_features": n, "tokens": budget, **r})
                    if not a.json:
                        print(f"{name:<14} {n:>7} {budget:>9}  FVU {r['fvu']:.4f}  L0 {r['l0']:6.1f}  "
                              f"dead {r['dead']:6.2%}  {r['tokens_per_s']:9,.0f} tok/s  lr {r['lr']}", flush=True)
    ratios = {}
    for r in rows:
        ref = next((s for s in rows if s["trainer"] == "sparsify" and s["n_features"] == r["n_features"]
                    and s["tokens"] == r["tokens"]), None)
        if r["trainer"] == "ours" and ref:
            ratios[f"{r['n_features']}x{r['tokens']}"] = {"fvu_vs_sparsify": r["fvu"] / ref["fvu"],
                                                         "speed_vs_sparsify": r["tokens_per_s"] / ref["tokens_per_s"]}
    if a.json:
        print(json.dumps({"rows": rows, "ours_vs_sparsify": ratios, "threads": torch.get_num_threads(),
                          "machine": os.uname().nodename}))
    else:
        for key, v in ratios.items():
            print(f"ours / sparsify at {key}: FVU x{v['fvu_vs_sparsify']:.3f}, tokens/s x{v['speed_vs_sparsify']:.2f}")


if __name__ == "__main__":
    main()
