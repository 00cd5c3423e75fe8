"""Evaluation and interpretation stages vs the model's forward pass alone, on the same contexts.

    python benchmarks/eval_throughput.py [--contexts 32] [--features 4096] [--sae PATH] [--json]

SmolLM2-135M-Instruct (the embedded default), hook model.layers.15, a topk SAE (random unless --sae
gives an exported one), held-out contexts of the embedded corpus, batch 8 x 128, fp32.

- interpretation (the streaming pass of the dashboard: forward to the hook, SAE encode, top-k /
  quantile-sample / histogram updates) against the forward pass to the hook alone;
- evaluation (clean forward capturing the hook, SAE, spliced forward and the zero / mean ablation
  forwards, CE and KL over the 49k vocabulary, plus a truncated pass for the ablation mean)
  against the full forward pass alone. It needs several forward passes per token by definition, so
  the table also shows it against those passes (forward tokens/s divided by the passes per token).
The cores are shared and noisy: the paths alternate batch by batch for --rounds rounds, and each
path's fastest time per batch counts. Interpretation continues one collector over all rounds (as
the stage does over its stream), after a warm-up pass over the batches."""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.analysis import InputConfig
from pipeline.analysis.batches import context_batches
from pipeline.analysis.collect import FeatureCollector, collect
from pipeline.analysis.metrics import evaluate
from pipeline.data import DataConfig
from pipeline.device import synchronize
from pipeline.interpret import InterpretConfig
from pipeline.models import ActivationCapture, ModelConfig, load_model

import bench_dictionary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-size", type=int, default=128)
    bench_dictionary.add_arguments(ap, features=4096)
    a = ap.parse_args()

    model_cfg = ModelConfig(device=a.device)
    loaded = load_model(model_cfg)
    data = DataConfig(source="embedded", split="test")
    n_tokens = a.contexts * a.context_size
    batches = list(context_batches(data, loaded.tokenizer, a.context_size, n_tokens, a.batch_size))
    tokens = sum(b.numel() for b in batches)
    d = bench_dictionary.load(a, loaded)
    capture = ActivationCapture(loaded, [d.hook])
    dev = loaded.device

    def forward_full(ids):
        with torch.inference_mode():
            loaded.model(input_ids=ids.to(dev), use_cache=False).logits.float().log_softmax(-1)

    def forward_to_hook(ids):
        capture(ids.to(dev))

    inp = InputConfig(data=data, context_size=a.context_size, n_tokens=n_tokens, batch_size=a.batch_size)
    icfg = InterpretConfig(input=inp, progress=False)
    # one collector for the whole run, as in the stage: after its first batches few entries enter
    collector = FeatureCollector(0, d.n_features, icfg.top_k, icfg.n_samples, icfg.context_before,
                                 icfg.context_after, device=dev)
    paths = {"forward_to_hook": forward_to_hook,
             "interpretation": lambda ids: collect(d, loaded, inp, collector, batches=[ids], progress=False),
             "forward_full": forward_full,
             "evaluation_spliced_only": lambda ids: evaluate(d, loaded, inp, ablations=[], progress=False,
                                                             batches=[ids]),
             "evaluation": lambda ids: evaluate(d, loaded, inp, progress=False, batches=[ids])}
    for ids in batches:  # warm-up (and the collector's first, most expensive, updates)
        forward_to_hook(ids)
        paths["interpretation"](ids)
    # the cores are shared and their load swings within seconds: alternate the paths batch by batch,
    # repeat, and keep each path's fastest time per batch
    best = {k: [float("inf")] * len(batches) for k in paths}
    cpu = {k: [float("inf")] * len(batches) for k in paths}
    for _ in range(a.rounds):
        for b, ids in enumerate(batches):
            for name, fn in paths.items():
                synchronize(dev)
                t, c = time.perf_counter(), time.process_time()
                fn(ids)
                synchronize(dev)
                best[name][b] = min(best[name][b], time.perf_counter() - t)
                cpu[name][b] = min(cpu[name][b], time.process_time() - c)
    best = {k: tokens / sum(v) for k, v in best.items()}
    # CPU seconds of this process: what other jobs on the cores take is not counted (on a GPU the
    # wall-clock figures are the ones to read)
    cpu = {k: tokens / sum(v) for k, v in cpu.items()}
    # forward passes per evaluated token: clean + spliced (+ zero + mean, + the truncated mean pass)
    hook_share = best["forward_full"] / best["forward_to_hook"]  # cost of a truncated pass in full passes
    passes = {"evaluation_spliced_only": 2.0, "evaluation": 4.0 + hook_share}
    out = {"machine": (torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"),
           "tokens": tokens, "batch_size": a.batch_size, "context_size": a.context_size, "hook": d.hook,
           "sae": a.sae or f"random topk, {a.features} features, k={a.k}", "tokens_per_s": best,
           "tokens_per_cpu_s": cpu,
           "cpu_interpretation_vs_forward_to_hook": cpu["interpretation"] / cpu["forward_to_hook"],
           "cpu_evaluation_vs_its_forward_passes":
               cpu["evaluation"] * (4.0 + cpu["forward_full"] / cpu["forward_to_hook"]) / cpu["forward_full"],
           "cpu_evaluation_spliced_only_vs_its_forward_passes":
               cpu["evaluation_spliced_only"] * 2 / cpu["forward_full"],
           "interpretation_vs_forward_to_hook": best["interpretation"] / best["forward_to_hook"],
           "evaluation_vs_forward_full": best["evaluation"] / best["forward_full"],
           "evaluation_passes_per_token": passes["evaluation"],
           "evaluation_vs_its_forward_passes": best["evaluation"] * passes["evaluation"] / best["forward_full"],
           "evaluation_spliced_only_vs_its_forward_passes":
               best["evaluation_spliced_only"] * 2 / best["forward_full"],
           "target_ratio": 0.8}
    if a.json:
        print(json.dumps(out))
        return
    print(f"\n{out['machine']}, {tokens} tokens, SAE: {out['sae']} at {d.hook}")
    print(f"{'path':<42}{'tokens/s':>9}{'ratio':>7}{'tok/cpu-s':>11}{'ratio':>7}")
    cp = out["cpu_evaluation_vs_its_forward_passes"]
    rows = [(f"forward to {d.hook}", "forward_to_hook", None, None),
            ("interpretation (streaming pass)", "interpretation", out["interpretation_vs_forward_to_hook"],
             out["cpu_interpretation_vs_forward_to_hook"]),
            ("forward, full model (+ log-softmax)", "forward_full", None, None),
            ("evaluation, clean + spliced", "evaluation_spliced_only",
             out["evaluation_spliced_only_vs_its_forward_passes"], out["cpu_evaluation_spliced_only_vs_its_forward_passes"]),
            ("evaluation, + zero and mean ablation", "evaluation", out["evaluation_vs_its_forward_passes"], cp)]
    for label, key, r, rc in rows:
        print(f"{label:<42}{best[key]:>9.0f}{'' if r is None else f'{r:.3f}':>7}{cpu[key]:>11.0f}"
              f"{'' if rc is None else f'{rc:.3f}':>7}")
    print(f"interpretation: ratio to the forward pass to the hook; evaluation: ratio to the forward passes it "
          f"needs (2, and {passes['evaluation']:.2f} with the ablations; {out['evaluation_vs_forward_full']:.3f} "
          "against a single forward pass)")
    print("target: >= 0.8")


if __name__ == "__main__":
    main()
