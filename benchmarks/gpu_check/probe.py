"""The device check's probe (run with the check's venv): the card and the versions as one JSON
line, or exit 1 naming why torch cannot use a GPU here and the fix."""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    if torch.version.cuda is None:
        sys.exit(f"probe: torch {torch.__version__} is a CPU-only build. Fix: rerun with --torch-spec naming a CUDA "
                 "wheel of torch (or delete the venv, whose torch is this one)")
    if not torch.cuda.is_available():
        sys.exit(f"probe: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi, the "
                 "driver's CUDA version and CUDA_VISIBLE_DEVICES")
    p = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(json.dumps({"card": p.name, "memory_GiB": round(p.total_memory / 2 ** 30, 1),
                      "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                      "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                      "nccl": ".".join(map(str, torch.cuda.nccl.version())), "triton": triton_version,
                      "bf16": torch.cuda.is_bf16_supported()}))


if __name__ == "__main__":
    main()
