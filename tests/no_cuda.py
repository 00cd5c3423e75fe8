"""A process without CUDA, whatever machine or torch build the tests run on: after `block_cuda()`
torch.cuda.is_available() is False and device_count() 0, as on a CPU machine, and every call that
would touch a GPU (initialising CUDA, which tensor creation on a GPU, pinned memory and streams go
through; selecting, querying or synchronising a device) raises and is recorded in CALLS, so that a
caller that swallows the error is still caught. Call it before importing the code under test:
modules that copied a function out of torch.cuda keep the original."""

from __future__ import annotations

import torch

CALLS: list[str] = []

DEVICE_CALLS = ("_lazy_init", "init", "set_device", "current_device", "synchronize", "Stream", "Event",
                "current_stream", "default_stream", "stream", "memory_allocated", "max_memory_allocated",
                "memory_reserved", "mem_get_info", "reset_peak_memory_stats", "get_device_name",
                "get_device_properties", "get_device_capability")


class CudaCalled(RuntimeError):
    pass


def _refuse(name: str):
    """A function that raises, or for a class (Stream, Event) a class whose construction raises:
    libraries use those in annotations at import time (`torch.cuda.Stream | None`)."""
    def call(*args, **kwargs):
        CALLS.append(name)
        raise CudaCalled(f"torch.cuda.{name} called in a process without CUDA")
    if isinstance(getattr(torch.cuda, name), type):
        return type(name, (), {"__new__": call})
    return call


def block_cuda() -> None:
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0
    for name in DEVICE_CALLS:
        setattr(torch.cuda, name, _refuse(name))
