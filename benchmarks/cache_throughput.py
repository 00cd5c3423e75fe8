"""Caching stage, with chunk checksums on and off, vs the model's own forward pass up to the hooked
layer, on the same batches.

    python benchmarks/cache_throughput.py [--contexts 96] [--device auto|cpu|cuda] [--json]

All run SmolLM2-135M-Instruct (the embedded default) to model.layers.15 on the same contexts of the
embedded corpus, alternately, --repeats times each; the table shows the best run of each. The
caching stage's time covers its whole loop: forward, BOS drop, fp16 conversion, the non-finite
check, statistics, compression (the default blosc-lz4), the CRC32C of each chunk (store.checksum,
on by default) and writes to a local store (on a background thread), and the final flush. The model
computes in --dtype (default: float32 on the CPU, bfloat16 on CUDA, as ModelConfig advises); on
CUDA the forward pass is timed to the end of its queued work."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from itertools import islice

import numpy as np
import torch

from pipeline.cache import CacheConfig, StoreConfig, run
from pipeline.data import DataConfig, iter_documents, pack_contexts
from pipeline.device import resolve_device, synchronize
from pipeline.models import ActivationCapture, ModelConfig, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--hook", default="model.layers.15")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto", help="the model's device: auto, cpu or cuda")
    ap.add_argument("--dtype", default=None, help="the model's dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # the stages' progress lines; stdout is the result
        out = measure(a)
    if a.json:
        print(json.dumps(out))
        return
    print(f"\n{'path':<40}{'tokens/s':>12}{'/ forward':>12}")
    print(f"{'forward to ' + a.hook:<40}{out['forward_tokens_per_s']:>12.0f}")
    print(f"{'caching stage, fp16, checksums on':<40}{out['cache_tokens_per_s']:>12.0f}{out['ratio']:>12.3f}")
    print(f"{'caching stage, fp16, checksums off':<40}{out['cache_no_checksum_tokens_per_s']:>12.0f}"
          f"{out['ratio_no_checksum']:>12.3f}")
    print(f"ratio caching / forward (checksums on): {out['ratio']:.3f} (target >= 0.9); "
          f"checksums on / off: {out['checksums_on_vs_off']:.3f}")


def measure(a) -> dict:
    device = resolve_device(a.device, "--device")
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model_cfg = ModelConfig(device=str(device), dtype=dtype)
    data = DataConfig(source="embedded")
    loaded = load_model(model_cfg)
    capture = ActivationCapture(loaded, [a.hook])
    contexts = list(islice(pack_contexts(iter_documents(data), loaded.tokenizer, a.context_size), a.contexts))
    batches = [torch.from_numpy(np.stack(contexts[i:i + a.batch_size])) for i in range(0, a.contexts, a.batch_size)]
    rows = a.contexts * (a.context_size - 1)

    def forward_only() -> float:
        synchronize(device)
        t = time.perf_counter()
        for ids in batches:
            capture(ids)
        synchronize(device)
        return a.contexts * a.context_size / (time.perf_counter() - t)

    def caching(checksum: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CacheConfig(model=model_cfg, data=data, hooks=[a.hook], context_size=a.context_size,
                              n_tokens=rows, batch_size=a.batch_size, progress=False,
                              store=StoreConfig(url=f"{tmp}/store", shard_contexts=32, chunk_contexts=32,
                                                checksum=checksum))
            res = run(cfg)
        # the forward pass computes every position, the store keeps all but BOS: count positions
        return res.tokens / res.seconds * a.context_size / (a.context_size - 1)

    forward_only()  # warm-up
    fwd, cache, unchecked = [], [], []
    for _ in range(a.repeats):
        fwd.append(forward_only())
        cache.append(caching(checksum=True))
        unchecked.append(caching(checksum=False))
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return {"machine": machine, "device": str(device), "dtype": dtype, "contexts": a.contexts,
            "context_size": a.context_size, "batch_size": a.batch_size, "hook": a.hook,
            "forward_tokens_per_s": max(fwd), "cache_tokens_per_s": max(cache),
            "cache_no_checksum_tokens_per_s": max(unchecked), "ratio": max(cache) / max(fwd),
            "ratio_no_checksum": max(unchecked) / max(fwd), "checksums_on_vs_off": max(cache) / max(unchecked),
            "target_ratio": 0.9}


if __name__ == "__main__":
    main()
