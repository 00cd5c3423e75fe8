"""The interpretation stage's feature passes: replaying the first pass's sparse codes (the default)
against streaming the corpus through model and SAE again for every pass, on the same contexts.

    python benchmarks/interpret_passes.py [--features 16384] [--per-pass 4096] [--tokens 20000] [--sae PATH] [--json]

A dictionary too wide for one collector (InterpretConfig.features_per_pass, 16,384 by default) is
interpreted in n_features / per_pass passes: a million features take 62. SmolLM2-135M-Instruct (the
embedded default), hook model.layers.15, a topk SAE (random unless --sae gives an exported one),
held-out text of the embedded corpus, the interpretation stage's collector settings. Each path
fills every pass's collector; the two must agree exactly (checked)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.analysis import InputConfig
from pipeline.analysis import collect as C
from pipeline.data import DataConfig
from pipeline.device import synchronize
from pipeline.interpret import InterpretConfig
from pipeline.models import ModelConfig, load_model

import bench_dictionary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-pass", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=20000)
    bench_dictionary.add_arguments(ap, features=16384)
    a = ap.parse_args()

    loaded = load_model(ModelConfig(device=a.device))
    cfg = InterpretConfig(input=InputConfig(data=DataConfig(source="embedded", split="test"), n_tokens=a.tokens),
                          features_per_pass=a.per_pass, progress=False)
    d = bench_dictionary.load(a, loaded)

    def make(lo, hi):
        return C.FeatureCollector(lo, hi, cfg.top_k, cfg.n_samples, cfg.context_before, cfg.context_after,
                                  device=loaded.device, seed=cfg.seed)

    def passes(replay_bytes: int) -> tuple[float, list]:
        default, C.REPLAY_BYTES = C.REPLAY_BYTES, replay_bytes
        try:
            synchronize(loaded.device)
            t = time.perf_counter()
            out = [(c.count.cpu(), c.top.score.cpu(), c.top.tokens.cpu(), c.samples.tokens.cpu())
                   for c in C.feature_passes(C.SparseCodes(d, loaded, cfg.input), a.per_pass, make, progress=False)]
            synchronize(loaded.device)
            return time.perf_counter() - t, out
        finally:
            C.REPLAY_BYTES = default

    t_stream, stream = passes(0)
    t_replay, replay = passes(C.REPLAY_BYTES)
    same = all(torch.equal(x, y) for s, r in zip(stream, replay) for x, y in zip(s, r)) and len(stream) == len(replay)
    if not same:
        raise SystemExit("replayed passes differ from streamed ones")
    n_pass = len(replay)
    out = {"machine": (torch.cuda.get_device_name() if loaded.device.type == "cuda"
                       else f"{torch.get_num_threads()} CPU threads"),
           "features": d.n_features, "per_pass": a.per_pass, "passes": n_pass, "tokens": a.tokens,
           "sae": a.sae or f"random topk, {a.features} features, k={a.k}",
           "seconds": {"stream_every_pass": t_stream, "replay": t_replay},
           "speedup": t_stream / t_replay}
    if a.json:
        print(json.dumps(out))
        return
    print(f"\n{out['machine']}, {a.tokens} tokens, SAE: {out['sae']} at {d.hook}, {n_pass} passes of {a.per_pass}")
    print(f"{'path':<40}{'seconds':>9}{'s/pass':>8}")
    for label, key in (("stream the corpus every pass", "stream_every_pass"), ("replay the first pass's codes", "replay")):
        print(f"{label:<40}{out['seconds'][key]:>9.1f}{out['seconds'][key] / n_pass:>8.1f}")
    print(f"ratio (stream / replay): {out['speedup']:.2f}x; the collectors are identical")


if __name__ == "__main__":
    main()
