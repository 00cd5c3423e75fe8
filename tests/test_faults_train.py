"""The fault suite of training (issue 15): what used to spin, hang or fail with a raw traceback
ends with a clear error or a clean, resumable stop.

- A batch larger than an epoch (also once the exclusion rules have dropped rows) is refused with
  both numbers, where it used to cycle through epochs at 100% CPU forever.
- SIGTERM and SIGUSR1 stop a run whose loader is stalled in a read: a chunk file made a FIFO blocks
  the read as a hung mount would. The run checkpoints the last step (if it did one) and exits 0,
  which slurm/train.sbatch takes as "requeue me"; with two ranks, the one waiting for data and
  the one waiting for it agree; a jumprelu run stalled in the read of the first batch, which sets its
  initial thresholds before any step, stops as well.
- A NaN input row makes the non-finite-loss error name the step and the store row.
- Resuming with another dictionary shape names both shapes.

Behaviour of the command line and of signals runs in real `python -m pipeline.train` processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import USER_ERROR_EXIT, ConfigError
from pipeline.store import ActivationLoader, ActivationStore
from pipeline.store import format as F
from pipeline.store.loader import Interrupted
from pipeline.train.data import RankBatches
from test_train import _cfg, _descendants, _launch, run_train, synthetic_store, tiny

HOOK = "blocks.0"
WINDOW = 256  # data.shuffle_buffer of the signal tests: one chunk of synthetic_store per window


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    """synthetic_store: 2048 rows of d_model 16, 32 per context, 8 chunks of 256 rows."""
    return synthetic_store(str(tmp_path_factory.mktemp("faults-train") / "acts"))


@pytest.fixture
def store(pristine, tmp_path) -> str:
    """A copy of the store that the test may damage."""
    return str(shutil.copytree(pristine, tmp_path / "acts"))


# -- a batch larger than an epoch ------------------------------------------------------------------
def test_the_loader_refuses_an_epoch_smaller_than_a_batch(pristine):
    with pytest.raises(ConfigError, match=r"epoch 0 gives data-parallel rank 0 \(of 1\) 2048 rows, fewer than "
                                          r"one batch of 4096 rows.* Fix: a smaller batch_size"):
        ActivationLoader(pristine, 4096, drop_last=True, epochs=None)
    with pytest.raises(ConfigError, match=r"rank 0 \(of 2\) 1024 rows, fewer than one batch of 1500 "
                                          "rows per rank"):
        ActivationLoader(pristine, 1500, dp_size=2, drop_last=True, epochs=None)
    # exclusions are known once an epoch is read: that epoch is the last, not the first of infinitely many
    loader = ActivationLoader(pristine, 2048, drop_last=True, epochs=None, exclude_positions_below=1)
    with pytest.raises(ConfigError, match=r"1984 rows \(64 excluded by exclude_positions_below\), fewer than one "
                                          "batch of 2048"):
        next(iter(loader))
    # without drop_last only an epoch that keeps no row at all yields nothing
    loader = ActivationLoader(pristine, 64, epochs=None, exclude_positions_below=32)
    with pytest.raises(ConfigError, match=r"0 rows \(2048 excluded by exclude_positions_below\)"):
        next(iter(loader))


@pytest.mark.parametrize("overrides,expected", [
    (["batch_size=4096", "n_tokens=8192"], "2048 rows, fewer than one batch of 4096"),
    (["batch_size=2048", "n_tokens=8192", "data.exclude_positions_below=1"],
     "1984 rows (64 excluded by exclude_positions_below), fewer than one batch of 2048")],
    ids=["store", "after-exclusions"])
def test_training_refuses_a_batch_larger_than_an_epoch(pristine, tmp_path, overrides, expected):
    p = run_train([f"data.url={pristine}", "data.exclude_norm_factor=null", "sae.n_features=32", "sae.k=4",
                   f"out_dir={tmp_path}", *overrides], check=False, timeout=300)
    assert p.returncode == USER_ERROR_EXIT and expected in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()


# -- signals during a stalled read -----------------------------------------------------------------
def test_an_interrupt_ends_a_stalled_wait_and_keeps_the_position(pristine, monkeypatch):
    st = ActivationStore.open(pristine)
    reading, release = threading.Event(), threading.Event()
    read_chunk = st.read_chunk

    def stalled(*args, **kwargs):
        reading.set()
        release.wait()
        return read_chunk(*args, **kwargs)

    monkeypatch.setattr(st, "read_chunk", stalled)
    interrupt = threading.Event()
    loader = ActivationLoader(st, 64, interrupt=interrupt)
    try:
        batches = iter(loader)
        assert reading.wait(timeout=60)
        interrupt.set()
        with pytest.raises(Interrupted):
            next(batches)
        thread = loader._running[1]
        loader.close()  # returns although the read is still stalled
        assert not thread.is_alive()
    finally:
        release.set()
    interrupt.clear()
    first = next(iter(loader))  # the batch that the interrupted wait did not take
    loader.close()
    assert torch.equal(first, next(iter(ActivationLoader(pristine, 64))))


def stall(store: str, window: int, dp_rank: int = 0, dp_size: int = 1) -> Path:
    """Make the chunk that the trainer's loader (seed 0, data.shuffle_buffer=WINDOW) reads for
    `window` of rank `dp_rank` a FIFO: reading it blocks until a writer opens the other end, as a
    read on a hung mount blocks. Returns the FIFO's path."""
    st = ActivationStore.open(store)
    plan = ActivationLoader(st, 1, dp_rank=dp_rank, dp_size=dp_size, shuffle_buffer=WINDOW).plan(0)
    (chunk,) = plan.segments[plan.windows[window]:plan.windows[window + 1], 1]
    path = Path(store, st.chunk_key(F.hook_path(HOOK, F.ACTS), int(chunk)))
    path.unlink()
    os.mkfifo(path)
    return path


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n" + proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def logged(out: Path, step: int):
    """Whether the run logged `step`; for 0, whether it is about to train (the log is created
    just before the first batch is asked for)."""
    path = out / "metrics.jsonl"
    return lambda: path.exists() and (step == 0 or any(json.loads(line)["step"] == step
                                                        for line in path.read_text().splitlines()))


@contextmanager
def launched(args: list[str], nproc: int):
    p = _launch(args, nproc)
    try:
        yield p
    finally:
        if p.poll() is None:  # a run that ignored the signal: end it and everything it started
            for pid in _descendants(p.pid) + [p.pid]:
                os.kill(pid, signal.SIGKILL)
            p.communicate()


def ranks(torchrun) -> list[int]:
    """The training processes that a torchrun launcher started."""
    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # a helper process that has ended since
            return b""
    return [pid for pid in _descendants(torchrun.pid) if b"pipeline.train" in cmdline(pid)]


@pytest.mark.parametrize("nproc,sig,window", [(1, signal.SIGTERM, 1), (1, signal.SIGUSR1, 0), (2, signal.SIGUSR1, 1)],
                         ids=["sigterm-after-8-steps", "sigusr1-before-any-step", "2-ranks-sigusr1-after-16-steps"])
def test_a_signal_stops_a_run_stalled_on_a_read(store, tmp_path, nproc, sig, window):
    """The stalled chunk is one that rank nproc - 1 reads (nobody ever opens the FIFO's other end):
    with two ranks, the other rank has its next batch and waits in the all-reduce that decides
    whether to stop."""
    per_rank = 32 // nproc
    steps = window * WINDOW // per_rank  # the steps that the windows before the stalled one feed
    stall(store, window, nproc - 1, nproc)
    out = tmp_path / "out"
    with launched(tiny(store, out, "n_tokens=3200", f"data.shuffle_buffer={WINDOW}", "data.exclude_norm_factor=null",
                       f"log_every={max(steps, 1)}", f"parallel.data_parallel={nproc}"), nproc) as p:
        wait_for(logged(out, steps), p, f"step {steps}")
        for pid in ranks(p) if nproc > 1 else [p.pid]:  # as srun signals every task
            os.kill(pid, sig)
        log = p.communicate(timeout=120)[0]
    assert p.returncode == 0, log[-3000:]
    assert f"stopped by a signal after step {steps}" in log, log[-3000:]
    latest = out / "checkpoints" / "latest"
    if steps:
        assert latest.read_text() == f"step-{steps}"
        assert len(list((out / "checkpoints" / f"step-{steps}").glob("loader-rank*.json"))) == nproc
    else:
        assert not latest.exists() and "no step was done" in log


def test_a_signal_ends_jumprelus_read_of_its_first_batch(store, tmp_path):
    """jumprelu reads the first batch before the engine exists (its thresholds start at each latent's
    quantile there): a signal during that stalled read stops the run cleanly, nothing to save."""
    stall(store, 0)
    out = tmp_path / "out"
    args = [a if a != "sae=topk" else "sae=jumprelu" for a in tiny(store, out, "n_tokens=3200",
            f"data.shuffle_buffer={WINDOW}", "data.exclude_norm_factor=null")]

    def reading() -> bool:  # a thread of the trainer blocks in the FIFO's open (no writer ever comes)
        return any(_read(t / "wchan") == "wait_for_partner" for t in Path(f"/proc/{p.pid}/task").glob("*"))

    with launched(args, 1) as p:
        wait_for(reading, p, "the read of the first batch")
        assert not (out / "metrics.jsonl").exists()  # still initialising
        os.kill(p.pid, signal.SIGTERM)
        log = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "no step was done" in log, log[-3000:]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a thread that has ended since
        return ""


# -- non-finite input, resume with another shape ----------------------------------------------------
def test_a_nan_row_is_named_with_the_step(store, tmp_path):
    row = 1234
    zarr.open_group(store, mode="r+")[F.hook_path(HOOK, F.ACTS)][row] = np.full(16, np.nan, np.float32)
    batches = RankBatches(ActivationStore.open(store), HOOK, _cfg(store, tmp_path), 0, 1, "cpu")
    step = next(i for i, x in enumerate(batches) if not torch.isfinite(x).all())  # the trainer's batches
    batches.close()
    p = run_train(tiny(store, tmp_path / "out", "n_tokens=2048", "data.exclude_norm_factor=null"), check=False,
                  timeout=300)
    assert p.returncode == USER_ERROR_EXIT, p.stderr[-3000:]
    assert f"at step {step} (" in p.stderr and f"store rows {row} of {store}" in p.stderr, p.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == f"step-{step}"


def test_resuming_with_another_dictionary_shape_names_both(pristine, tmp_path):
    run_train(tiny(pristine, tmp_path, "n_tokens=64"), timeout=300)
    p = run_train(tiny(pristine, tmp_path, "n_tokens=64", "sae.n_features=64"), check=False, timeout=300)
    assert p.returncode == USER_ERROR_EXIT, p.stderr[-3000:]
    assert (f"the checkpoint {tmp_path / 'checkpoints' / 'step-2'} was written with sae.n_features=32; this run "
            "has sae.n_features=64") in p.stderr, p.stderr[-3000:]
    assert "Fix: resume with sae.n_features=32, or set out_dir to a new folder" in p.stderr
