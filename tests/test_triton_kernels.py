"""The Triton kernels of pipeline/sae/triton_kernels.py against the torch references, on CPU.

triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when the module is imported, and
the setting is process-wide; so the interpreted runs happen in one subprocess (this file run as a
script with TRITON_INTERPRET=1), which reports a JSON line per case, and the tests here check it.
That keeps the pytest process, and any GPU test in it, on compiled kernels.

Tolerances. Each kernel accumulates in fp32 and rounds once to its output dtype; the reference
is the repo's dense torch version (sparse.dense_decode, the dense code's matmuls) in fp64 on the
same (fp32 or bf16) inputs, which is exact to fp64. The standard bound for an fp32 sum of T
products, |error| <= (T + 1) * 2^-24 * sum |terms|, plus for a bf16 output the final rounding,
gives each element's tolerance. That rounding is to nearest on a GPU, <= 2^-8 * |value| (bf16 has
8 significant bits), but the interpreter truncates (its fp32 -> bf16 cast_impl passes no rounding
mode; its own "rtne" mode is no better: the carry out of the mantissa is OR-ed into the exponent),
<= 2^-7 * |value|: so 2^-7 under the interpreter. The kernels keep the plain .to(), which is
round-to-nearest where it matters, in compiled code; `err` is the largest error / tolerance (pass:
<= 1). The repo's torch sparse path (embedding_bag, sparse.rows_grad) obeys the same bound, so
the kernel and it differ by at most twice that (`err_torch`). The wiring cases run sparse_decode,
gather_linear and a TopK SAE step with the kernels dispatched (TRITON_INTERPRET=1) and without, in
fp32: the two differ by summation order only, so by a few ulp of the sums' magnitudes; they must
agree to 1e-5 of the largest |entry| (~100 ulp: the sums have <= ~100 terms of mixed sign).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs the triton package (pip install triton)")

# name: (tokens B, entries per token k, d_model, rows in the shard, dtype, BLOCK_M, BLOCK_D)
KERNEL_CASES = {
    "k7_d37_n50_fp32": (6, 7, 37, 50, "float32", 16, 128),          # one masked block each way
    "k33_d576_n1001_fp32": (5, 33, 576, 1001, "float32", 16, 128),  # 3 k-blocks (tail 1), 4.5 d-blocks
    "k7_d37_n50_bf16": (6, 7, 37, 50, "bfloat16", 16, 128),
    "k33_d576_n1001_bf16": (5, 33, 576, 1001, "bfloat16", 16, 128),
    "k7_d37_n203_small_blocks": (6, 7, 37, 203, "float32", 4, 16),  # 2 k-blocks, 3 d-blocks, both tails masked
    "k5_d130_n3_duplicates": (9, 5, 130, 3, "float32", 16, 128),   # 45 entries on 3 rows: every row repeats
    "k1_d1_n1": (4, 1, 1, 1, "float32", 16, 128),
    "k0_empty_code": (4, 0, 37, 50, "float32", 16, 128),
}
KERNELS = ("gather_sum", "gather_dot", "rows_grad")
WIRING_CASES = ("sparse_decode_raw", "sparse_decode_unit_norm", "gather_linear", "topk_sae_step")
ROOT = Path(__file__).resolve().parents[1]


def _bound_ratio(got, truth, abs_sum, terms: int, other=None):
    """max |got - truth| / tolerance (and vs `other`, the torch path, / twice it): see the docstring."""
    import torch

    from pipeline.sae.triton_kernels import INTERPRETED
    u_out = (2.0 ** -7 if INTERPRETED else 2.0 ** -8) if got.dtype == torch.bfloat16 else 0.0
    tol = u_out * truth.abs() + (terms + 1) * 2.0 ** -24 * abs_sum + 1e-30
    r = {"err": ((got.double() - truth).abs() / tol).max().item() if got.numel() else 0.0}
    if other is not None:
        r["err_torch"] = ((got.double() - other.double()).abs() / (2 * tol)).max().item() if got.numel() else 0.0
    return r


def run_kernel_case(name: str, device: str = "cpu") -> dict:
    """The three kernels on one shape against the fp64 dense reference and the torch sparse path."""
    import torch
    import torch.nn.functional as F

    from pipeline.sae import triton_kernels as tk
    from pipeline.sae.sparse import dense_decode, rows_grad
    B, k, d, n, dt, bm, bd = KERNEL_CASES[name]
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    idx = torch.randint(0, n, (B, k), generator=gen)
    if k > 1:
        idx[:, 1] = idx[:, 0]  # a duplicate within each token
    if B > 1 and k:
        idx[-1] = idx[0]  # and a whole token's indices again
    W, x, gy = (torch.randn(*s, generator=gen).to(dtype) for s in ((n, d), (B, d), (B, d)))
    v = torch.randn(B, k, generator=gen).to(dtype)
    idx, W, x, gy, v = (t.to(device) for t in (idx, W, x, gy, v))
    f64 = lambda t: t.double()  # noqa: E731
    code = lambda vals: torch.zeros(B, n, dtype=torch.float64, device=device).scatter_add(1, idx, vals)  # noqa: E731
    out = {}

    got = tk.gather_sum(idx, W, v, bm, bd)
    ref = F.embedding_bag(idx, W, per_sample_weights=v, mode="sum") if k else None
    out["gather_sum"] = _bound_ratio(got, dense_decode(f64(v), idx, f64(W)),
                                     dense_decode(f64(v).abs(), idx, f64(W).abs()), k, ref)

    got = tk.gather_dot(idx, W, gy, bm, bd)
    ref = None
    if k:  # the torch path: embedding_bag's gradient in its weights (sparse._SparseDecode.backward)
        v_ = v.clone().requires_grad_()
        ref, = torch.autograd.grad(F.embedding_bag(idx, W, per_sample_weights=v_, mode="sum"), v_, gy)
    out["gather_dot"] = _bound_ratio(got, (f64(W)[idx] * f64(gy)[:, None]).sum(-1),
                                     (f64(W).abs()[idx] * f64(gy).abs()[:, None]).sum(-1), d, ref)

    got = tk.rows_grad(idx, v, x, n, bm, bd)
    assert got.dtype == torch.float32 and got.shape == (n, d)
    ref = rows_grad(idx, v, x, n) if k else None
    out["rows_grad"] = _bound_ratio(got, code(f64(v)).T @ f64(x), code(f64(v).abs()).T @ f64(x).abs(), B * k, ref)
    return out


def _wiring(name: str) -> dict:
    """One case's outputs and gradients, with whatever sparse.triton_for picks now."""
    import torch

    from pipeline.sae import SAEConfig, create
    from pipeline.sae.sparse import gather_linear, sparse_decode
    gen = torch.Generator().manual_seed(3)
    B, k, d, n = 10, 7, 37, 203
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(B)])
    idx[1] = idx[0]
    if name == "topk_sae_step":
        sae = create(SAEConfig(architecture="topk", n_features=n, d_model=d, k=k, k_aux=33, dead_tokens=1))
        sae.reset_parameters(seed=1)
        sae.train()
        sae.tokens_since_fired += 2  # every latent dead: AuxK (k_aux = 33) runs too
        o = sae(torch.randn(B, d, generator=gen))
        o.loss.backward()
        return {"loss": o.loss.detach(), **{p: t.grad for p, t in sae.named_parameters()}}
    W = torch.randn(n, d, generator=gen).requires_grad_()
    if name.startswith("sparse_decode"):
        vals = torch.randn(B, k, generator=gen).relu().requires_grad_()
        y = sparse_decode(vals, idx, W, unit_norm=name.endswith("unit_norm"))
        (y * torch.randn(B, d, generator=gen)).sum().backward()
        return {"y": y.detach(), "vals": vals.grad, "W": W.grad}
    x, b, c = (torch.randn(*s, generator=gen).requires_grad_() for s in ((B, d), (n,), (d,)))
    pre = torch.nn.functional.linear(x - c, W, b).gather(1, idx).detach()
    y = gather_linear(x, W, b, c, idx, pre)
    (y * torch.randn(B, k, generator=gen)).sum().backward()
    return {"y": y.detach(), "x": x.grad, "W": W.grad, "b": b.grad, "c": c.grad}


def run_wiring_case(name: str) -> dict:
    """Relative max difference per output/gradient, kernels dispatched vs torch, and the kernel calls."""
    from pipeline.sae import triton_kernels as tk
    calls, originals = dict.fromkeys(KERNELS, 0), {kname: getattr(tk, kname) for kname in KERNELS}
    for kname in KERNELS:  # count the calls: the kernels must really be the ones dispatched
        def counted(*a, _f=originals[kname], _k=kname, **kw):
            calls[_k] += 1
            return _f(*a, **kw)
        setattr(tk, kname, counted)
    try:
        os.environ["TRITON_INTERPRET"] = "0"  # sparse.triton_for -> None: the torch path
        ref = _wiring(name)
        os.environ["TRITON_INTERPRET"] = "1"
        got = _wiring(name)
    finally:
        for kname, f in originals.items():
            setattr(tk, kname, f)
    diff = {key: ((got[key] - ref[key]).abs().max() / ref[key].abs().max().clamp_min(1e-30)).item() for key in ref}
    return {"rel_diff": diff, "calls": calls}


def _main() -> None:
    """Run as a script with TRITON_INTERPRET=1: one JSON line of every case's result (or error)."""
    import torch
    from pipeline.sae import triton_kernels as tk
    torch.set_num_threads(1)
    results = {"interpreted": tk.INTERPRETED}
    for name, fn in [*((c, run_kernel_case) for c in KERNEL_CASES), *((c, run_wiring_case) for c in WIRING_CASES)]:
        t0 = time.perf_counter()
        try:
            results[name] = fn(name)
        except Exception as e:  # noqa: BLE001 - reported to the test of this case
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert results["interpreted"], "TRITON_INTERPRET=1 did not reach triton.jit"
    return results


@NEEDS_TRITON
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_match_reference_under_interpreter(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, r["error"]
    for kname in KERNELS:
        assert r[kname]["err"] <= 1, (kname, r[kname])
        assert r[kname].get("err_torch", 0) <= 1, (kname, r[kname])


@NEEDS_TRITON
@pytest.mark.parametrize("case", WIRING_CASES)
def test_sparse_paths_dispatch_to_kernels_under_interpreter(interpreted, case):
    r = interpreted[case]
    assert "error" not in r, r["error"]
    used = {k for k, c in r["calls"].items() if c}
    want = {"sparse_decode_raw": set(KERNELS), "sparse_decode_unit_norm": set(KERNELS),
            "gather_linear": {"gather_sum", "rows_grad"}, "topk_sae_step": set(KERNELS)}[case]
    assert used == want, r["calls"]
    for key, diff in r["rel_diff"].items():
        assert diff <= 1e-5, (key, r["rel_diff"])


def test_cpu_tensors_keep_the_torch_path(monkeypatch):
    import torch

    from pipeline.sae.sparse import triton_for
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_for(torch.zeros(2), torch.zeros(2, dtype=torch.long)) is None


def test_import_without_triton():
    """With triton unimportable the module imports (AVAILABLE False) and dispatch stays on torch,
    even with TRITON_INTERPRET=1; the sparse paths still run."""
    code = ("import os, sys, torch\n"
            "sys.modules['triton'] = None\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from pipeline.sae import triton_kernels as tk\n"
            "from pipeline.sae.sparse import sparse_decode, triton_for\n"
            "assert not tk.AVAILABLE and not tk.INTERPRETED\n"
            "assert triton_for(torch.zeros(1)) is None\n"
            "W = torch.randn(5, 3, requires_grad=True)\n"
            "sparse_decode(torch.ones(2, 2), torch.tensor([[0, 1], [1, 1]]), W, True).sum().backward()\n"
            "assert W.grad is not None\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.gpu
@NEEDS_TRITON
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_match_reference_on_cuda(case):
    """The compiled kernels on a GPU, same cases and bounds (the CPU twin: the interpreter tests)."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pipeline.sae import triton_kernels as tk
    from pipeline.sae.sparse import triton_for
    if tk.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels are not compiled")
    assert triton_for(torch.zeros(1, device="cuda")) is tk
    r = run_kernel_case(case, "cuda")
    for kname in KERNELS:
        assert r[kname]["err"] <= 1, (kname, r[kname])
        assert r[kname].get("err_torch", 0) <= 1, (kname, r[kname])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main()
