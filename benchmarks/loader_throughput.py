"""Activation loader vs raw reads of the same store files, on a local disk and on S3 (moto), with
chunk checksums on and off.

    python benchmarks/loader_throughput.py [--rows 200000] [--d-model 576] [--device cpu|cuda] [--json]

Writes two synthetic stores (float16, the caching stage's default layout), one with chunk checksums
(CRC32C, the default) and one without, to a temp folder and copies them to a loopback S3 server
(moto, in its own process so that it does not share our GIL). For each, side by side and
alternately (best of --repeats; the two stores alternate too):
  raw seq   read every activation chunk file's bytes with fsspec, one after another;
  raw par   the same on --workers threads (what the loader's readers could get at most);
  loader    one epoch of ActivationLoader (shuffled batches on --device: float32 on the CPU, the
            stored dtype in pinned memory copied to CUDA; default settings but a smaller shuffle
            window, --shuffle-buffer), timed from iter() to the last batch, first window included;
            MB/s counts the same file bytes.
Local reads start from a cold page cache (the store's pages are dropped with posix_fadvise, which
touches no other file), so "raw" is the disk's rate. "loader CPU s/GB" is the process's CPU time
(all its threads) per GB of chunk files, and "rows/s per core" the rows it delivered per second of
that CPU time: what one core of loader work gives, whatever else shares the machine.
"x trainer" divides the loader's rows/s by what the trainer consumes, and "cores/trainer" is how
many cores of loader work that consumption takes. The trainer's rate is measured in the same run
(benchmarks/train_throughput.py in its own process, before the reads: a topk step, batch 4096, at
--trainer-n-features latents on --device) unless --trainer-rows-per-s states one.
Finally it times a gloo broadcast of one batch between two processes: the cost per batch of
"one feature-parallel rank reads and broadcasts", the alternative to each rank reading.
"checksums on / off" divides the loader's rows/s with checksums by its rows/s without."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import torch

from pipeline.device import resolve_device, synchronize
from pipeline.store import ActivationLoader, ActivationStore, ActivationStoreWriter, StoreLayout, commit


CHECKSUMS = {"on": True, "off": False}


def write_store(url: str, rows: int, d_model: int, checksum: bool) -> None:
    rpc = 127  # a 128-token context without BOS, 32 contexts per chunk: the caching defaults
    layout = StoreLayout(("h",), d_model, "float16", -(-rows // rpc), rpc, shard_contexts=256, chunk_contexts=32,
                         checksum=checksum)
    writer = ActivationStoreWriter(url, layout, {"fingerprint": "bench"}, overwrite=True)
    gen = torch.Generator().manual_seed(0)
    for k in range(layout.n_shards):
        span = layout.shard_contexts_range(k)
        n = len(span) * rpc
        writer.begin_shard(k)
        writer.append({"h": torch.randn(n, d_model, generator=gen) * 4 + 1},
                      torch.arange(n) + span.start * rpc, torch.arange(span.start, span.stop).repeat_interleave(rpc),
                      torch.arange(1, rpc + 1).repeat(len(span)))
        writer.end_shard(len(span))
    writer.close()
    commit(writer)


def chunk_files(store: ActivationStore) -> list[str]:
    return [store.storage.path(store.chunk_key(f"hooks/{store.hooks[0]}/acts", c)) for c in range(store.n_chunks)]


def drop_cache(store: ActivationStore) -> None:
    """Drops this store's pages from the page cache (only local files; others are untouched)."""
    if store.storage.fs.protocol not in ("file", ("file", "local")):
        return
    for root, _, names in os.walk(store.storage.root):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def raw_read(store: ActivationStore, workers: int) -> float:
    files, fs = chunk_files(store), store.storage.fs
    drop_cache(store)
    t = time.perf_counter()
    if workers == 1:
        nbytes = sum(len(fs.cat_file(f)) for f in files)
    else:
        with ThreadPoolExecutor(workers) as pool:
            nbytes = sum(pool.map(lambda f: len(fs.cat_file(f)), files))
    return nbytes / (time.perf_counter() - t) / 1e6


def loader_read(store: ActivationStore, batch_size: int, workers: int, shuffle_buffer: int, device) -> dict:
    nbytes = sum(store.storage.fs.size(f) for f in chunk_files(store))
    drop_cache(store)
    loader = ActivationLoader(store, batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer, device=device)
    t, cpu = time.perf_counter(), time.process_time()
    rows, first = 0, None
    for batch in loader:
        rows += len(batch)
        first = first or time.perf_counter() - t
    synchronize(device)  # the last batch's copy to the GPU is done
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    assert rows == store.n_tokens
    return {"MB_s": nbytes / dt / 1e6, "rows_s": rows / dt, "first_batch_s": first, "cpu_s_per_GB": cpu / nbytes * 1e9,
            "rows_per_core_s": rows / cpu}


def measure(stores: dict[str, ActivationStore], a, trainer_rows_s: float) -> dict:
    """The best rates of each store (by checksums "on"/"off"), and the loader's ratio of the two."""
    runs = {k: {"raw_seq": [], "raw_par": [], "loader": []} for k in stores}
    order = list(stores.items())
    for i in range(a.repeats):  # alternate, in turn first and second, so that noise and warm-up hurt all alike
        for k, store in order if i % 2 == 0 else order[::-1]:
            runs[k]["raw_seq"].append(raw_read(store, 1))
            runs[k]["raw_par"].append(raw_read(store, a.workers))
            runs[k]["loader"].append(loader_read(store, a.batch_size, a.workers, a.shuffle_buffer, a.device))
    out = {f"checksums_{k}": summary(r, trainer_rows_s) for k, r in runs.items()}
    out["loader_checksums_on_vs_off"] = out["checksums_on"]["loader_rows_s"] / out["checksums_off"]["loader_rows_s"]
    return out


def summary(runs: dict, trainer_rows_s: float) -> dict:
    """One store's best rates over the repeats, and the ratios of the targets."""
    best = max(runs["loader"], key=lambda r: r["rows_s"])
    out = {"raw_seq_MB_s": max(runs["raw_seq"]), "raw_par_MB_s": max(runs["raw_par"]),
           "loader_MB_s": best["MB_s"], "loader_rows_s": best["rows_s"], "first_batch_s": best["first_batch_s"],
           "loader_cpu_s_per_GB": best["cpu_s_per_GB"],
           "loader_rows_per_core_s": max(r["rows_per_core_s"] for r in runs["loader"])}
    out["loader_vs_raw_seq"] = out["loader_MB_s"] / out["raw_seq_MB_s"]
    out["loader_vs_raw_par"] = out["loader_MB_s"] / out["raw_par_MB_s"]
    out["x_trainer"] = out["loader_rows_s"] / trainer_rows_s
    out["cores_per_trainer"] = trainer_rows_s / out["loader_rows_per_core_s"]
    return out


def trainer_rate(device, n_features: int, d_model: int, batch_size: int) -> dict:
    """Rows/s of a topk training step on this machine's device (benchmarks/train_throughput.py in a
    process of its own, so that its process group and threads do not share ours)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.py")
    p = subprocess.run([sys.executable, script, "--device", str(device), "--variants", "topk", "--n-features",
                        str(n_features), "--d-model",
                        str(d_model), "--batch", str(batch_size), "--repeats", "2", "--json"],
                       capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"rows_s": r["steps"]["topk"]["tokens_per_s"],
            "source": f"measured: topk step at {n_features} latents, {r['device']}, {r['precision']}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, options
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _broadcast_worker(rank: int, port: int, shape: tuple, n: int, result) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.randn(shape) if rank == 0 else torch.empty(shape)
    dist.broadcast(x, 0)  # warm-up: connections
    dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        dist.broadcast(x, 0)
    dist.barrier()
    if rank == 1:
        result.put((time.perf_counter() - t) / n)
    dist.destroy_process_group()


def broadcast_cost(batch_size: int, d_model: int, n: int = 20) -> float:
    """Seconds per gloo broadcast of one float32 batch between two processes."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_broadcast_worker, args=(r, port, (batch_size, d_model), n, result)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = result.get(timeout=300)
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=4, help="loader num_workers, and threads of 'raw par'")
    ap.add_argument("--shuffle-buffer", type=int, default=2 ** 15,
                    help="rows per shuffle window; smaller than the loader's default 2^17 so that an epoch of "
                         "this small store is several windows, not mostly the first window's read")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trainer-rows-per-s", type=float, default=None,
                    help="what the trainer consumes (rows/s), stated; default: measured here (--trainer-n-features)")
    ap.add_argument("--trainer-n-features", type=int, default=4096,
                    help="latents of the topk step whose consumption is measured")
    ap.add_argument("--device", default="cpu",
                    help="where batches go, and the measured trainer runs: cpu, or cuda (pinned memory, non-blocking "
                         "copies of the stored dtype: the trainer's path on a GPU)")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-broadcast", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.device = resolve_device(a.device, "--device")

    results: dict = {"rows": a.rows, "d_model": a.d_model, "dtype": "float16", "batch_size": a.batch_size,
                     "shuffle_buffer": a.shuffle_buffer,
                     "cpus": os.cpu_count(), "device": str(a.device),
                     "load_average_before": os.getloadavg()[0]}  # other users of a shared machine
    results["trainer"] = ({"rows_s": a.trainer_rows_per_s, "source": "stated (--trainer-rows-per-s)"}
                          if a.trainer_rows_per_s else trainer_rate(a.device, a.trainer_n_features, a.d_model,
                                                                    a.batch_size))
    trainer_rows_s = results["trainer"]["rows_s"]
    with tempfile.TemporaryDirectory() as tmp:
        urls = {k: os.path.join(tmp, f"store-checksums-{k}") for k in CHECKSUMS}
        for k, url in urls.items():
            write_store(url, a.rows, a.d_model, CHECKSUMS[k])
        local = {k: ActivationStore.open(url) for k, url in urls.items()}
        results["store_MB"] = sum(os.path.getsize(f) for f in chunk_files(local["on"])) / 1e6
        results["local"] = measure(local, a, trainer_rows_s)
        if not a.no_s3:
            proc, options = start_moto()
            try:
                fs = fsspec.filesystem("s3", **options)
                fs.mkdir("bench")
                for k, url in urls.items():
                    fs.put(url, f"bench/{k}", recursive=True)
                results["s3"] = measure({k: ActivationStore.open(f"s3://bench/{k}", options) for k in urls}, a,
                                        trainer_rows_s)
            finally:
                proc.kill()
    if not a.no_broadcast:
        seconds = broadcast_cost(a.batch_size, a.d_model)
        results["broadcast"] = {"s_per_batch": seconds, "MB_s": a.batch_size * a.d_model * 4 / seconds / 1e6,
                                "loader_s_per_batch": a.batch_size / results["local"]["checksums_on"]["loader_rows_s"]}

    if a.json:
        print(json.dumps(results))
        return
    print(f"{a.rows} rows x {a.d_model} float16 ({results['store_MB']:.0f} MB of chunk files), batch {a.batch_size}, "
          f"shuffle window {a.shuffle_buffer} rows, "
          f"{a.workers} reader threads, {os.cpu_count()} CPUs (load average {results['load_average_before']:.1f} "
          f"before the run), best of {a.repeats}")
    t = results["trainer"]
    print(f"trainer: {t['rows_s']:,.0f} rows/s ({t['source']})")
    head = ("store", "checksums", "raw seq MB/s", "raw par MB/s", "loader MB/s", "loader rows/s", "loader/raw seq",
            "loader/raw par", "x trainer", "first batch s", "loader CPU s/GB", "rows/s per core", "cores/trainer")
    print(" | ".join(head))
    for name in [n for n in ("local", "s3") if n in results]:
        for k in CHECKSUMS:
            r = results[name][f"checksums_{k}"]
            print(" | ".join([name, k, f"{r['raw_seq_MB_s']:.0f}", f"{r['raw_par_MB_s']:.0f}",
                              f"{r['loader_MB_s']:.0f}", f"{r['loader_rows_s']:,.0f}", f"{r['loader_vs_raw_seq']:.0%}",
                              f"{r['loader_vs_raw_par']:.0%}", f"{r['x_trainer']:.1f}x", f"{r['first_batch_s']:.2f}",
                              f"{r['loader_cpu_s_per_GB']:.1f}", f"{r['loader_rows_per_core_s']:,.0f}",
                              f"{r['cores_per_trainer']:.2f}"]))
    print("loader rows/s, checksums on / off: " + ", ".join(
        f"{name} {results[name]['loader_checksums_on_vs_off']:.2f}" for name in ("local", "s3") if name in results))
    if "broadcast" in results:
        b = results["broadcast"]
        print(f"read-and-broadcast alternative: gloo broadcast of one float32 batch between 2 processes "
              f"{b['s_per_batch'] * 1e3:.1f} ms ({b['MB_s']:.0f} MB/s); each rank reading it itself: "
              f"{b['loader_s_per_batch'] * 1e3:.1f} ms of loader time, on background threads")


if __name__ == "__main__":
    main()
