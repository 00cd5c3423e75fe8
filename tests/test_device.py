"""Device-agnostic stages. Every stage that computes runs with its device set to cpu explicitly
(model.device / input.model.device, the trainer's device) in a process where CUDA does not exist
(CUDA_VISIBLE_DEVICES empty, and tests/no_cuda.py: every torch.cuda call that would touch a GPU
raises and is recorded): cache -> train (with held-out metrics) -> evaluate -> interpret -> steer
-> audit, chained on the tiny Llama. And asking for cuda on a machine without CUDA is a clear error
naming the setting and the fix, before any model, store or process group is touched.

Run as a script, this file is that process (the test starts it): `python tests/test_device.py
MODEL_DIR TEXT_DIR OUT_DIR` writes OUT_DIR/stages.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOK = "layers.1"


def run_stages(model_dir: Path, text_dir: Path, tmp: Path) -> dict:
    """Each stage with device=cpu, each reading what the one before wrote; what each produced."""
    import yaml

    from pipeline.analysis import InputConfig
    from pipeline.audit import AuditConfig, run as audit
    from pipeline.audit.tasks import TASKS
    from pipeline.cache import CacheConfig, StoreConfig, run as cache
    from pipeline.data import DataConfig
    from pipeline.evaluate import EvalConfig, run as evaluate
    from pipeline.interpret import InterpretConfig, run as interpret
    from pipeline.models import ModelConfig
    from pipeline.sae import SAEConfig
    from pipeline.steer import SteerConfig, run as steer
    from pipeline.train import TrainConfig, train
    from pipeline.train.config import ActivationDataConfig
    from test_audit import zebra_set

    model = ModelConfig(name=str(model_dir), device="cpu")
    text = DataConfig(source="files", path=[f"{text_dir}/*.txt"], split="all")
    acts = str(tmp / "acts")
    out: dict = {}
    r = cache(CacheConfig(model=model, data=text, store=StoreConfig(url=acts, chunk_contexts=2, shard_contexts=4),
                          hooks=[HOOK], context_size=32, n_tokens=600, progress=False))
    out["cache"] = {"tokens": r.tokens, "committed": r.committed}

    export = train(TrainConfig(device="cpu", data=ActivationDataConfig(url=acts), n_tokens=128, batch_size=32,
                               sae=SAEConfig(architecture="topk", n_features=64, k=4, k_aux=8),
                               out_dir=str(tmp / "train"), progress=False, heldout_url=acts, heldout_tokens=256))
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    out["train"] = {"export": str(export), "backend": dist.get_backend(), "deepspeed": get_accelerator().device_name(),
                    "heldout_fvu": json.loads((tmp / "train" / "heldout.json").read_text())["fvu"]}

    def given(**kw) -> InputConfig:
        return InputConfig(checkpoint=str(export), model=model, context_size=32, batch_size=2, **kw)

    heldout_text = DataConfig(source="files", path=[f"{text_dir}/*"], split="test", test_fraction=0.5)
    m = evaluate(EvalConfig(input=given(data=heldout_text, n_tokens=32 * 4), progress=False,
                            out_dir=str(tmp / "evaluate")))
    out["evaluate"] = {"fvu": m["fvu"], "ce_loss_recovered": m["ce_loss_recovered"]}

    interpret(InterpretConfig(input=given(data=text, n_tokens=32 * 6), top_k=3, n_samples=3,
                              crosslingual_in_dashboard=False, out_dir=str(tmp / "interpret"), progress=False))
    features = json.loads((tmp / "interpret" / "features.json").read_text())["features"]
    live = max(features, key=lambda f: f["max_act"])
    out["interpret"] = {"features": len(features), "live_feature": live["index"], "max_act": live["max_act"]}

    s = steer(SteerConfig(input=given(), prompt="The quick brown fox", clamp=[f"{live['index']}:20x"],
                          features=str(tmp / "interpret" / "features.json"), max_new_tokens=4,
                          out_dir=str(tmp / "steer")))
    out["steer"] = {"clean": s["clean"], "steered": s["steered"]}

    concepts = tmp / "zebra.yaml"
    concepts.write_text(yaml.safe_dump(zebra_set()), encoding="utf-8")
    doc = audit(AuditConfig(task=TASKS["concepts"].Config(concepts=[str(concepts)], top=2), input=given(),
                            dashboard=str(tmp / "interpret"), out_dir=str(tmp / "audit")))
    out["audit"] = {"ranked": [r["feature"] for r in doc["concepts"]["concepts"][0]["features"]]}
    return out


def test_every_stage_runs_on_the_cpu_in_a_process_without_cuda(tiny_model_dir, text_dir, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PIPELINE_RUNS": str(tmp_path / "runs")}
    p = subprocess.run([sys.executable, __file__, str(tiny_model_dir), str(text_dir), str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    doc = json.loads((tmp_path / "stages.json").read_text())
    assert doc["blocked"] == {"is_available": False, "synchronize": "CudaCalled", "tensor": "CudaCalled"}
    assert doc["cuda_calls"] == []  # also none that a caller caught and went on
    s = doc["stages"]
    assert s["cache"]["committed"] and s["cache"]["tokens"] >= 600
    assert s["train"]["backend"] == "gloo" and s["train"]["deepspeed"] == "cpu"
    assert math.isfinite(s["train"]["heldout_fvu"])
    assert (Path(s["train"]["export"]) / "cfg.json").is_file()
    assert math.isfinite(s["evaluate"]["fvu"]) and math.isfinite(s["evaluate"]["ce_loss_recovered"])
    assert s["interpret"]["features"] == 64 and s["interpret"]["max_act"] > 0
    assert s["steer"]["clean"] != s["steer"]["steered"]  # the clamp acted
    assert len(s["audit"]["ranked"]) == 2


def test_cuda_on_a_machine_without_it_names_the_setting_and_the_fix(monkeypatch, tmp_path):
    import torch

    from pipeline.device import planned_device, resolve_device
    from pipeline.errors import ConfigError
    from pipeline.models import ModelConfig, load_model
    from pipeline.train import TrainConfig, train
    from pipeline.train.config import ActivationDataConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for value in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"model\.device={value} but .*Fix: model\.device=cpu"):
            resolve_device(value, "model.device")
    assert resolve_device("auto", "device") == torch.device("cpu")
    assert planned_device("cuda", "device") == torch.device("cuda")  # a dry run plans a GPU run on a CPU machine
    # the stages refuse before reading anything: the model folder and the store do not exist
    with pytest.raises(ConfigError, match=r"model\.device=cuda but"):
        load_model(ModelConfig(name=str(tmp_path / "no-model"), device="cuda"))
    with pytest.raises(ConfigError, match=r"device=cuda but .*Fix: device=cpu"):
        train(TrainConfig(device="cuda", data=ActivationDataConfig(url=str(tmp_path / "no-store")),
                          out_dir=str(tmp_path / "train")))


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cpu:0", "CUDA"])
def test_a_value_that_is_not_a_device_is_refused_when_configured(value, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.models import ModelConfig
    from pipeline.train import TrainConfig
    with pytest.raises(ConfigError, match=rf"model\.device='{value}' is not a device; choose one of"):
        ModelConfig(device=value)
    with pytest.raises(ConfigError, match=rf"^device='{value}' is not a device"):
        TrainConfig(device=value, out_dir=str(tmp_path))


def test_the_command_line_reports_a_missing_gpu_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PIPELINE_RUNS": str(tmp_path / "runs")}
    p = subprocess.run([sys.executable, "-m", "pipeline.train", "device=cuda", f"data.url={tmp_path / 'none'}",
                        f"out_dir={tmp_path / 'train'}", "hydra.output_subdir=null", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "pipeline.train: ConfigError: device=cuda but" in p.stderr and "Fix: device=cpu" in p.stderr
    assert "Traceback" not in p.stderr


if __name__ == "__main__":
    from no_cuda import CALLS, block_cuda  # first: before anything under test imports torch.cuda's functions
    block_cuda()
    import torch
    blocked = {"is_available": torch.cuda.is_available()}
    for name, call in {"synchronize": torch.cuda.synchronize, "tensor": lambda: torch.zeros(1, device="cuda")}.items():
        try:
            call()
        except Exception as e:  # noqa: BLE001 (which error a build raises is what is recorded)
            blocked[name] = type(e).__name__
    CALLS.clear()  # those were the checks above
    model_dir, text_dir, out_dir = map(Path, sys.argv[1:4])
    stages = run_stages(model_dir, text_dir, out_dir)
    (out_dir / "stages.json").write_text(json.dumps({"blocked": blocked, "cuda_calls": CALLS, "stages": stages}))
