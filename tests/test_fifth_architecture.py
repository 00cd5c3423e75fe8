"""A fifth architecture is one class in pipeline/sae/ and conf/sae/<name>.yaml, nothing else (issue 16).

GainTopK is written here as it would be in pipeline/sae/gain_topk.py: a TopK SAE whose kept latents
carry a learned per-feature gain, so it has its own parameter, its own SAELens mapping and its own
planner term. The fixture registers it for this file's tests only. It goes through every stage that
has to know about architectures: the config (a conf/sae/gain_topk.yaml composed by Hydra),
create/forward/encode, export and load, the planner and the trainer's dry run against the real
modules, the release writer, its reload and the model card, and the scaling fit's compute count.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from torch import Tensor, nn

import pipeline.publish as P
from pipeline.config import CONF_DIR
from pipeline.cost_model import PlanConfig, make_plan, rank_memory, step_flops
from pipeline.errors import ConfigError
from pipeline.parallel import ParallelDims
from pipeline.sae import ARCHITECTURES, CLASSES, SAEConfig, SparseCode, create, load, register, save
from pipeline.sae.topk import TopK

NAME = "gain_topk"
D, N, K = 16, 48, 4


class GainTopK(TopK):
    """TopK whose kept latents are scaled by a learned per-feature gain: z_i = g_i ReLU(pre_i)."""

    architecture = NAME
    feature_tensors = TopK.feature_tensors + ("gain",)
    saelens_note = "gain_topk SAEs are published as SAELens TopK SAEs with the gains folded into W_dec."

    def __init__(self, cfg: SAEConfig, features: range | None = None, device=None):
        super().__init__(cfg, features, device)
        self.gain = nn.Parameter(torch.ones(len(self.features), device=device))

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, mean: Tensor | None = None) -> None:
        super().reset_parameters(seed, mean)
        self.gain.fill_(1.0)

    def code(self, x: Tensor, b_dec: Tensor, idx: Tensor, pre: Tensor, keep: Tensor) -> Tensor:
        return super().code(x, b_dec, idx, pre, keep) * self.gain[idx]

    @classmethod
    def saelens_state(cls, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """SAELens's TopK decodes ReLU(pre) with W_dec: the gains go into its rows; extras keep ours."""
        out, extras = super().saelens_state(state)
        out["W_dec"] = (state["gain"][:, None] * state["W_dec"]).contiguous()
        return out, {**extras, "W_dec": state["W_dec"].contiguous(), "gain": state["gain"].contiguous()}

    @classmethod
    def planned_parameters(cls, d: int, n: int) -> list[int]:
        return super().planned_parameters(d, n) + [n]  # gain


@pytest.fixture
def gain_topk():
    """GainTopK registered for one test (not with @register at import: no other test sees it)."""
    register(GainTopK)
    yield GainTopK
    del CLASSES[NAME]


def make(seed: int = 0, features: range | None = None) -> GainTopK:
    sae = create(SAEConfig(architecture=NAME, n_features=N, d_model=D, k=K), features)
    sae.reset_parameters(seed, mean=torch.linspace(-1, 1, D))
    with torch.no_grad():  # every tensor non-trivial
        g = torch.Generator().manual_seed(seed)
        sae.gain.copy_(0.5 + torch.rand(len(sae.features), generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(len(sae.features), generator=g))
    return sae


def data(n: int = 32) -> Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def test_unregistered_it_is_refused_and_no_other_test_sees_it():
    assert NAME not in CLASSES and NAME not in ARCHITECTURES
    with pytest.raises(ConfigError, match=r"sae.architecture='gain_topk' is not one of \['relu_l1', 'topk'"):
        SAEConfig(architecture=NAME)
    with pytest.raises(ConfigError, match="architecture='gain_topk' is not one of"):
        PlanConfig(sae=SAEConfig(architecture=NAME, d_model=D))


def test_its_config_is_one_yaml_file(gain_topk, tmp_path):
    """conf/sae/gain_topk.yaml, composed by Hydra as `python -m pipeline.train sae=gain_topk` does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pipeline.train.__main__  # noqa: F401 - registers train_schema
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    (conf / "sae" / f"{NAME}.yaml").write_text(f"architecture: {NAME}\nk: 8\n")
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"sae={NAME}"]))
    assert (cfg.sae.architecture, cfg.sae.k, cfg.out_dir) == (NAME, 8, f"runs/demo/train/{NAME}")
    with pytest.raises(ConfigError, match="sae.k=0 must be in"):  # it uses k: SAEConfig checks it
        SAEConfig(architecture=NAME, k=0)


def test_create_forward_encode(gain_topk):
    sae = make().train()
    out = sae(data())
    assert out.x_hat.shape == (32, D) and out.l0 == K and torch.isfinite(out.loss)
    out.loss.backward()
    assert sae.gain.grad is not None and sae.gain.grad.abs().sum() > 0
    sae.eval()
    with torch.no_grad():
        code = sae.encode(data())
        assert isinstance(code, SparseCode) and code.values.shape == code.indices.shape == (32, K)
        torch.testing.assert_close(code.dense(N) @ sae.decoder_weight() + sae.b_dec, sae(data()).x_hat)


def test_export_and_load(gain_topk, tmp_path):
    sae = make().eval()
    loaded = load(save(sae, tmp_path / "sae", input_scale=2.5))
    assert type(loaded) is GainTopK and torch.equal(loaded.gain, sae.gain)
    with torch.no_grad():  # the export takes raw activations: the training input scale is folded in
        a, b = sae.encode(data() * 2.5), loaded.encode(data())
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.values, b.values)
        torch.testing.assert_close(sae(data() * 2.5).x_hat / 2.5, loaded(data()).x_hat)


def test_planner_and_dry_run_count_its_own_parameter(gain_topk, capsys):
    from pipeline.plan import format_plan
    from pipeline.train import DeepSpeedConfig, TrainConfig
    from pipeline.train.dry_run import dry_run

    def plan(architecture: str) -> PlanConfig:
        return PlanConfig(sae=SAEConfig(architecture=architecture, d_model=576, n_features=2**20, k=32),
                          deepspeed=DeepSpeedConfig(zero_stage=1, precision="fp32"))
    ours = make_plan(plan(NAME), 1, 2)
    topk = make_plan(plan("topk"), 1, 2)
    assert ours.memory.weights - topk.memory.weights == 2**19 * 4  # the gains of one shard
    assert ours.flops_per_step == topk.flops_per_step == step_flops(ours.cfg)[1]  # a sparse step
    assert ours.memory.communication == topk.memory.communication and "k=32" in format_plan(ours)
    shard = ParallelDims(1, 2).feature_range(2**20, 0)
    sae = create(SAEConfig(architecture=NAME, n_features=2**20, d_model=576), shard, device="meta")
    assert rank_memory(ours.cfg, 1, 2).weights == 4 * sum(p.numel() for p in sae.parameters())
    # the trainer's dry run raises if the planner disagrees with the real sharded modules
    dry_run(TrainConfig(sae=SAEConfig(architecture=NAME, n_features=2**20 + 1, d_model=576),
                        parallel=ParallelDims(2, 3), deepspeed=DeepSpeedConfig(zero_stage=1, precision="bf16")))
    assert "matches the planner" in capsys.readouterr().out


def test_release_reloads_bit_for_bit_and_the_card_describes_it(gain_topk, tmp_path):
    from pipeline.publish.release import saelens_config

    export = save(make(), tmp_path / "run" / "sae", input_scale=2.5,
                  meta={"hook": "model.layers.3", "model": {"id": "HuggingFaceTB/SmolLM2-135M", "revision": None}})
    res = P.run(P.PublishConfig(checkpoints=[str(export)], out_dir=str(tmp_path / "rel"), require_metrics=False,
                                progress=False))
    folder = res.folder / res.sae_ids[0]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["apply_b_dec_to_input"], cfg["k"]) == ("topk", True, K)
    assert cfg == saelens_config(json.loads((folder / "pipeline.json").read_text()))
    assert json.loads((folder / "pipeline.json").read_text())["release"]["saelens_architecture"] == "topk"
    ours, again = load(export), P.load(folder)  # the release's SAELens tensors and extras give ours back
    assert type(again) is GainTopK and asdict(again.cfg) == asdict(ours.cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    card = (res.folder / "README.md").read_text()
    assert f"| {NAME} (k={K}) |" in card and GainTopK.saelens_note in card and f"- {NAME}" in card


def test_scaling_counts_its_sparse_step(gain_topk):
    from pipeline.scaling import ScalingConfig
    from pipeline.scaling.run import flop_model, flops_per_token, loss_key

    assert flops_per_token(NAME, D, 1024, 16) == 2 * D * 1024 + 8 * 16 * D  # the sparse count, as topk's
    assert loss_key(ScalingConfig(), {NAME}) == "fvu"  # a run at a fixed k: fit the FVU
    assert f"sparse step: topk, batchtopk, {NAME}" in flop_model()
