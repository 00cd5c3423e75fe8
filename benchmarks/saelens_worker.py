"""SAELens's TopK trainer on rows piped in by benchmarks/recipe.py (run with .venv-saelens's python:
SAELens lives in its own venv, `make setup-saelens`).

stdin: one JSON line {d, n, k, batch, steps, n_test}, then n_test held-out rows and steps * batch
training rows, float32, in the order to use. SAELens's own SAETrainer with its defaults (Adam lr
3e-4, constant schedule, its TopK AuxK and decoder init) trains on the batches as they arrive; its
step time excludes the wait for the pipe. stdout: one JSON line of the held-out score
(benchmarks/heldout_score.py) and the steady tokens/s."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_score import score  # noqa: E402


def read_rows(n: int, d: int) -> torch.Tensor:
    buf = sys.stdin.buffer.read(n * d * 4)
    return torch.frombuffer(bytearray(buf), dtype=torch.float32).view(n, d)


def main() -> None:
    p = json.loads(sys.stdin.buffer.readline())
    x_test = read_rows(p["n_test"], p["d"])
    steps: list[float] = []
    started = [0.0]

    def batches():
        for _ in range(p["steps"]):
            if started[0]:
                steps.append(time.perf_counter() - started[0])  # the previous step, without the pipe
            x = read_rows(p["batch"], p["d"])
            started[0] = time.perf_counter()
            yield x

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=p["d"], d_sae=p["n"], k=p["k"]))
    cfg = SAETrainerConfig(total_training_samples=p["steps"] * p["batch"], train_batch_size_samples=p["batch"],
                           lr_end=SAETrainerConfig.lr / 10)  # what its runner config's post-init sets
    SAETrainer(cfg, sae, batches()).fit()
    sae.eval()

    def run(part):
        acts = sae.encode(part)
        return sae.decode(acts), acts.nonzero()[:, 1]
    steady = steps[max(1, len(steps) // 10):]
    print(json.dumps({**score(run, x_test, p["n"]), "tokens_per_s": p["batch"] / statistics.median(steady),
                      "lr": cfg.lr}))


if __name__ == "__main__":
    main()
