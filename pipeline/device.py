"""Where a stage computes: the one `device` setting every stage takes (`auto`, `cpu`, `cuda` or
`cuda:N`), checked and resolved here so that each stage places its tensors on one torch.device
and never reaches for CUDA on a machine without it.

    model.device=cpu          # cache, evaluate, interpret, steer, audit (input.model.device there)
    device=cpu                # train

`auto` is CUDA where torch sees a GPU, else the CPU. Asking for CUDA where there is none is a
ConfigError naming the setting and the fix, raised before any model or process group is touched."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError

CHOICES = ("auto", "cpu", "cuda")


def check_device(value: str, key: str) -> None:
    """Refuse a value that is not auto, cpu, cuda or cuda:N (at config time: no device is touched)."""
    kind, _, index = str(value).partition(":")
    if kind not in CHOICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{key}={value!r} is not a device; choose one of {list(CHOICES)} (or cuda:N for GPU N)")


def planned_device(value: str, key: str) -> torch.device:
    """The device `value` names, without requiring it on this machine (a dry run plans on a CPU
    machine for a GPU run); `auto` is this machine's choice."""
    check_device(value, key)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def resolve_device(value: str, key: str) -> torch.device:
    """The device a stage runs on: planned_device, refused when it is a GPU this machine lacks."""
    device = planned_device(value, key)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no CUDA device (none installed, or CUDA_VISIBLE_DEVICES hides them)")
            raise ConfigError(f"{key}={value} but {why}. Fix: {key}=cpu (or {key}=auto, which picks the GPU where "
                              "there is one), or run on a machine with an NVIDIA GPU and a CUDA build of torch "
                              "(make setup TORCH_SPEC=\"torch==<version> <its CUDA wheel>\")")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={value} but torch sees {count} CUDA device(s), 0..{count - 1}. "
                              f"Fix: {key}=cuda:<one of those> or {key}=cuda")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (to time GPU work); the CPU has no queue to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

