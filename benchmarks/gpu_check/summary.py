"""The device check's one JSON summary, from the outputs its steps left in the output folder: the
card, each step's status, the GPU tests' counts, the figures, and the targets of issue 20 (dense
bf16 step >= 50% of the measured bf16 matmul rate; topk step >= 2x relu_l1's at 16,384 latents),
and what one GPU asks of the loader (cores of loader work per GPU at 4,096 and 65,536 latents)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StepResult:
    status: str  # ok, failed (exit N), timed out after N s, not run: why
    seconds: float
    stdout: Path


def summarize(results: dict[str, StepResult], out: Path) -> dict:
    doc: dict = {"steps": {name: {"status": r.status, "seconds": round(r.seconds, 1)} for name, r in results.items()}}
    got = {name: _json(r) for name, r in results.items()}
    doc["card"] = got.get("probe")
    doc["tests"] = _tests(out / "gpu-tests.xml")
    train = got.get("train-16384")
    if train:
        steps = train["steps"]
        doc["train_16384"] = {
            "device": train["device"], "precision": train["precision"],
            "bf16_matmul_tflop_per_s": train["matmul_gflop_per_s"] / 1e3,
            **{f"{k}_step_ms": s["step_s"] * 1e3 for k, s in steps.items()},
            **{f"{k}_tokens_per_s": s["tokens_per_s"] for k, s in steps.items()},
            "dense_flop_utilisation": steps["relu_l1"]["flop_efficiency"],
            "topk_vs_relu_l1": steps["topk"]["vs_relu_l1"], "topk_aux_vs_relu_l1": steps["topk+AuxK"]["vs_relu_l1"],
            "sparse_decode": train["sparse_decode"]}
        doc["targets"] = {"dense_bf16_step_vs_matmul": train["targets"]["flop_efficiency"],
                          "topk_vs_relu_l1_at_16384": train["targets"]["topk_vs_relu_l1"]}
    if got.get("cache"):
        doc["cache"] = {k: got["cache"][k] for k in ("machine", "dtype", "forward_tokens_per_s", "cache_tokens_per_s",
                                                     "ratio", "target_ratio")}
    loader = got.get("loader")
    gpu_rows = {}
    if loader:
        gpu_rows["4096"] = loader["trainer"]["rows_s"]
        local = loader["local"]["checksums_on"]
        doc["loader"] = {"rows_s": local["loader_rows_s"], "rows_per_core_s": local["loader_rows_per_core_s"],
                         "cpus": loader["cpus"], "device": loader["device"]}
    if got.get("train-65536"):
        gpu_rows["65536"] = got["train-65536"]["steps"]["topk"]["tokens_per_s"]
    doc["gpu_topk_step_rows_per_s"] = gpu_rows
    if loader:
        doc["loader_cores_per_gpu"] = {n: rows / doc["loader"]["rows_per_core_s"] for n, rows in gpu_rows.items()}
    return doc


def _json(r: StepResult):
    """A step's result: the last line of its stdout as JSON (the benchmarks' --json and the probe
    print one line last; libraries may print before it)."""
    lines = r.stdout.read_text().strip().splitlines() if r.status == "ok" else []
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _tests(junit: Path) -> dict | None:
    if not junit.is_file():
        return None
    cases = ET.parse(junit).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed}
