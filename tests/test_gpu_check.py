"""benchmarks/gpu_check.sh without a GPU: its dry run lists every step resolved; the tests it
runs (`pytest -m gpu`) are the ones it promises and skip here with a reason; its runner stops
after a failed setup and times a step out; and its summary reads the benchmarks' real --json
output (run here on the CPU at tiny shapes), so a renamed key fails here, not on the GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check"
sys.path.insert(0, str(CHECK))
from check import run  # noqa: E402
from steps import Step, makefile_torch_spec  # noqa: E402
from summary import StepResult, summarize  # noqa: E402


def dry_run(*args: str) -> str:
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_dry_run_lists_every_step_resolved_and_runs_nothing(tmp_path):
    venv, out = tmp_path / "venv", tmp_path / "out"
    text = dry_run("--venv", str(venv), "--out", str(out))
    py = f"TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 {venv}/bin/python"
    expected = {
        "setup": f"make -C {ROOT} setup VENV={venv} TORCH_SPEC={makefile_torch_spec()}",
        "probe": f"{py} {CHECK}/probe.py",
        "train-16384": f"{py} {ROOT}/benchmarks/train_throughput.py --device cuda --n-features 16384 --json",
        "train-65536": f"{py} {ROOT}/benchmarks/train_throughput.py --device cuda --n-features 65536 --variants topk",
        "cache": f"{py} {ROOT}/benchmarks/cache_throughput.py --device cuda --json",
        "loader": f"{py} {ROOT}/benchmarks/loader_throughput.py --device cuda",
        "gpu-tests": f"{py} -m pytest -m gpu -q -p no:cacheprovider --junitxml={out}/gpu-tests.xml {ROOT}/tests",
    }
    steps = re.findall(r"^step (\d+)/7 (\S+) \(at most (\d+) s\): .+\n  (.+)$", text, re.M)
    assert [name for _, name, _, _ in steps] == list(expected)
    for _, name, _, command in steps:
        assert command.startswith(expected[name]), (name, command)
    assert "within 480 s in all" in text  # the 8 minutes
    assert not venv.exists() and not out.exists()
    assert "'TORCH_SPEC=torch==2.5.1 --index-url X'" in dry_run("--torch-spec", "torch==2.5.1 --index-url X")


def test_the_gpu_marked_tests_are_the_promised_ones_and_skip_here_with_a_reason():
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_triton_kernels.py", "tests/test_train_parallel.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:]
    skips = re.findall(r"^SKIPPED \[(\d+)\] (\S+): (.+)$", p.stdout, re.M)
    where = {path.split(":")[0]: (int(n), reason) for n, path, reason in skips}
    assert where["tests/test_triton_kernels.py"][1].startswith("needs a CUDA GPU")
    assert where["tests/test_train_parallel.py"][1].startswith("needs a CUDA GPU")
    assert re.search(r"^(\d+) skipped, \d+ deselected", p.stdout, re.M), p.stdout[-1000:]
    assert " passed" not in p.stdout.splitlines()[-1]  # nothing ran on the CPU under the gpu marker


def test_a_failed_setup_stops_the_check_and_a_slow_step_times_out(tmp_path):
    py = [sys.executable, "-c"]
    steps = [Step("slow", "sleeps", py + ["import time; time.sleep(30)"], budget_s=1),
             Step("setup", "fails", py + ["raise SystemExit(3)"], budget_s=10),
             Step("probe", "would print", py + ["print(1)"], budget_s=10)]
    t = time.monotonic()
    results = run(steps, tmp_path, deadline=time.monotonic() + 60)
    assert time.monotonic() - t < 20
    assert results["slow"].status == "timed out after 1 s"
    assert results["setup"].status.startswith("failed (exit 3; see ")
    assert results["probe"].status == "not run: the setup step did not pass"
    late = run(steps[2:], tmp_path, deadline=time.monotonic() - 1)
    assert late["probe"].status == "not run: out of time"


def bench(name: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_the_summary_reads_the_benchmarks_json_output(tmp_path):
    train = bench("train_throughput.py", "--device", "cpu", "--n-features", "512", "--d-model", "32", "--batch", "256",
                  "--k", "4", "--repeats", "1")
    outputs = {
        "probe": json.dumps({"card": "test card"}),
        "train-16384": train,
        "train-65536": train,  # its topk-only run has the same keys (fewer steps)
        "cache": bench("cache_throughput.py", "--device", "cpu", "--contexts", "4", "--batch-size", "2", "--repeats",
                       "1", "--context-size", "16", "--hook", "model.layers.1"),
        "loader": bench("loader_throughput.py", "--rows", "5000", "--d-model", "32", "--batch-size", "256",
                        "--repeats", "1", "--no-s3", "--no-broadcast", "--trainer-rows-per-s", "1000"),
    }
    results = {}
    for name, text in outputs.items():
        (tmp_path / f"{name}.out").write_text("a library's line before the JSON\n" + text)
        results[name] = StepResult("ok", 1.0, tmp_path / f"{name}.out")
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/>'
        '</testcase><testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    doc = summarize(results, tmp_path)
    assert doc["card"] == {"card": "test card"}
    assert doc["tests"] == {"passed": 1, "failed": 1, "skipped": 1, "failed_tests": ["t::b"]}
    t = doc["train_16384"]
    assert t["precision"] == "fp32" and t["sparse_decode"] == {"skipped": "needs CUDA"}
    assert 0 < t["dense_flop_utilisation"] and t["topk_vs_relu_l1"] > 0 and t["bf16_matmul_tflop_per_s"] > 0
    assert set(doc["targets"]) == {"dense_bf16_step_vs_matmul", "topk_vs_relu_l1_at_16384"}
    assert doc["targets"]["topk_vs_relu_l1_at_16384"]["target"] == 2.0
    assert doc["cache"]["forward_tokens_per_s"] > 0
    assert doc["gpu_topk_step_rows_per_s"]["4096"] == 1000  # the loader's stated trainer rate
    assert doc["loader_cores_per_gpu"]["65536"] == pytest.approx(
        doc["gpu_topk_step_rows_per_s"]["65536"] / doc["loader"]["rows_per_core_s"])
    assert doc["steps"]["cache"] == {"status": "ok", "seconds": 1.0}
