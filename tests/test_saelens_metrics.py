"""Our evaluation's metrics (pipeline/analysis/metrics.py) against SAELens's own (sae_lens.evals,
6.54.12) for the same SAE, model and token batches.

SAELens's evals run a TransformerLens model; TransformerLens builds one only from an official model
name (it fetches that model's config), and our tiny test model is a random Llama saved to a folder. So
the SAELens side (in .venv-saelens, tests/saelens_venv.py) gives SAELens's eval helpers,
`get_sparsity_and_variance_metrics` and `get_downstream_reconstruction_metrics` (which call
`get_recons_loss`), the same transformers model behind the three calls they make of a
TransformerLens model: `run_with_cache` (the hook's activations), `model(tokens, return_type="both",
loss_per_token=True)` and `run_with_hooks` (a hook function applied to the hook's output).
`blocks.N.hook_resid_post` is the output of decoder layer N, as our release's cfg.json says. Every
metric's arithmetic (encoding, splicing, masking, averaging, the scores) is SAELens's code.

Where the definitions agree, and so are compared (our keys = SAELens's keys):
- explained_variance = explained_variance: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) over rows;
  mse = mse (per-row squared error summed over dimensions, averaged over rows);
  cosine_similarity = cossim; l0 = l0; feature_density = feature_density;
- ce_loss.clean / spliced / zero = ce_loss_without_sae / with_sae / with_ablation, and
  ce_loss_recovered = ce_loss_score: (CE_zero - CE_sae) / (CE_zero - CE_clean).
They agree when our evaluation keeps every position and row (input.exclude_positions_below=0,
input.exclude_norm_factor=null) and SAELens ignores no token (ignore_tokens=None), as here. Our
defaults differ from SAELens's: we leave out position 0 (BOS) from the reconstruction metrics, from
the splice and from the zero ablation, and rows above 8x the batch's median norm from the
reconstruction metrics; SAELens's run_evals ignores the pad, BOS and EOS tokens (by token id, at any
position) in the reconstruction metrics and the splice, but its zero ablation replaces every position,
and it masks a prediction by its input token where we mask by its target (BOS, pad).
Not compared: KL divergence. SAELens averages KL(clean || spliced) over every position, the last
included; ours over the positions that predict a token (the last has none).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from pipeline.analysis import Dictionary, InputConfig
from pipeline.analysis.batches import context_batches
from pipeline.analysis.metrics import evaluate
from pipeline.data import DataConfig
from pipeline.models import ModelConfig
from pipeline.publish.release import SAESource, write_sae_folder
from pipeline.sae import SAEConfig, create, save

sys.path.insert(0, str(Path(__file__).parent))
from saelens_venv import run_saelens  # noqa: E402

HOOK, LAYER = "model.layers.1", 1
TOLERANCE = {"fvu": {"rel": 1e-5}, "mse": {"rel": 1e-5}, "cosine_similarity": {"abs": 1e-6},
             "l0": {"rel": 1e-6}, "ce": {"rel": 1e-6}}
"""Both sides compute in float32 and sum in float64 (SAELens sums squared norms per batch and averages
losses in float32), so they differ by rounding only; l0 and densities are counts. FVU (1 - explained
variance) is compared, as explained variance may be near 0; the cosine absolutely, for the same reason.
ce_loss_recovered is a ratio of differences of CE losses: its tolerance is the CE tolerance carried
through (recovered_tolerance)."""


def recovered_tolerance(ce: dict, score: float) -> float:
    """First-order bound on the score's difference when each CE loss may differ by TOLERANCE["ce"]
    relative: (CE_zero - CE_sae) / (CE_zero - CE_clean) moves by at most (2 + 2 |score|) e / gap."""
    e = TOLERANCE["ce"]["rel"] * max(abs(v) for v in ce.values())
    return (2 + 2 * abs(score)) * e / abs(ce["zero"] - ce["clean"])

SAELENS_SIDE = """
import json, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from sae_lens import SAE
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.training.activation_scaler import ActivationScaler
args = json.loads(sys.argv[1])
batches = [t for _, t in sorted(load_file(args["tokens"]).items())]


class Model:
    # the TransformerLens calls SAELens's eval helpers make, over a transformers model
    def __init__(self, hf, hook, layer):
        self.hf, self.hook, self.layer = hf, hook, hf.model.layers[layer]

    def _forward(self, tokens, fn=None):
        def patch(_module, _inputs, out):
            return (fn(out[0], None), *out[1:]) if isinstance(out, tuple) else fn(out, None)
        handle = self.layer.register_forward_hook(patch) if fn else None
        try:
            logits = self.hf(input_ids=tokens, use_cache=False).logits
        finally:
            if handle:
                handle.remove()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        return logits, loss.view(tokens.shape[0], -1)

    def __call__(self, tokens, return_type="both", loss_per_token=True):
        return self._forward(tokens)

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True):
        ((name, fn),) = fwd_hooks
        assert name == self.hook, name
        return self._forward(tokens, fn)

    def run_with_cache(self, tokens, names_filter, prepend_bos=False, stop_at_layer=None):
        seen = {}
        def keep(x, hook):
            seen[self.hook] = x
            return x
        self._forward(tokens, keep)
        return None, seen


class Tokens:
    # SAELens's ActivationsStore as its eval helpers use it: our batches, in order
    def __init__(self):
        self.next = iter(batches)

    def get_batch_tokens(self, n):
        return next(self.next)


sae = SAE.load_from_disk(args["sae"])
model = Model(AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval(),
              sae.cfg.metadata.hook_name, args["layer"])
n, size = len(batches), batches[0].shape[0]
with torch.no_grad():
    sparsity, features = get_sparsity_and_variance_metrics(
        sae, model, Tokens(), ActivationScaler(), n, compute_l2_norms=False, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True, eval_batch_size_prompts=size,
        model_kwargs={}, ignore_tokens=None)
    downstream = get_downstream_reconstruction_metrics(
        sae, model, Tokens(), ActivationScaler(), compute_kl=True, compute_ce_loss=True, n_batches=n,
        eval_batch_size_prompts=size, ignore_tokens=None)
print(json.dumps({**sparsity, **downstream, "feature_density": features["feature_density"]}))
"""


@pytest.mark.parametrize("arch", ["topk", "relu_l1"])
def test_our_metrics_agree_with_saelens_evals(arch, tiny, tiny_model_dir, text_dir, tmp_path):
    import json
    sae = create(SAEConfig(architecture=arch, n_features=128, d_model=32, k=4))
    sae.reset_parameters(seed=0)
    save(sae, tmp_path / "sae", meta={"hook": HOOK, "model": {"id": str(tiny_model_dir)}})
    write_sae_folder(SAESource(tmp_path / "sae", None, None, None, None), tmp_path / "release", 1 << 30)
    data = DataConfig(source="files", path=[str(text_dir / "*")], split="test", test_fraction=0.5)
    inp = InputConfig(checkpoint=str(tmp_path / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=data, context_size=32, n_tokens=32 * 6, batch_size=3, exclude_positions_below=0,
                      exclude_norm_factor=None)
    batches = list(context_batches(data, tiny.tokenizer, inp.context_size, inp.n_tokens, inp.batch_size))
    ours = evaluate(Dictionary.attach(sae, tiny, HOOK), tiny, inp, ablations=("zero",), progress=False,
                    batches=batches)
    save_file({f"{i:04d}": b.contiguous() for i, b in enumerate(batches)}, str(tmp_path / "tokens.safetensors"))
    theirs = json.loads(run_saelens(SAELENS_SIDE, {"sae": str(tmp_path / "release" ), "model": str(tiny_model_dir),
                                                   "tokens": str(tmp_path / "tokens.safetensors"), "layer": LAYER}))
    theirs["fvu"] = 1 - theirs["explained_variance"]
    pairs = {"fvu": "fvu", "mse": "mse", "cosine_similarity": "cossim", "l0": "l0"}
    for key, their_key in pairs.items():
        assert ours[key] == pytest.approx(theirs[their_key], **TOLERANCE[key]), key
    ce = {"clean": "ce_loss_without_sae", "spliced": "ce_loss_with_sae", "zero": "ce_loss_with_ablation"}
    for key, their_key in ce.items():
        assert ours["ce_loss"][key] == pytest.approx(theirs[their_key], **TOLERANCE["ce"]), key
    # the same formula (ours on their losses gives their score), and the same score within what the
    # losses' rounding allows (the tiny random model's zero ablation moves CE by only ~0.005)
    z, c, sp = (theirs[ce[k]] for k in ("zero", "clean", "spliced"))
    assert theirs["ce_loss_score"] == pytest.approx((z - sp) / (z - c), rel=1e-9)
    assert ours["ce_loss_recovered"] == pytest.approx(
        theirs["ce_loss_score"], abs=recovered_tolerance(ours["ce_loss"], ours["ce_loss_recovered"]))
    assert ours["feature_density"] == pytest.approx(theirs["feature_density"], rel=1e-6, abs=1e-6)
    assert ours["l0"] > 0 and ours["ce_loss"]["spliced"] != ours["ce_loss"]["clean"]  # it fires and it matters
    print(f"{arch}: ours {({k: ours[k] for k in pairs})}, ce {ours['ce_loss']}, recovered {ours['ce_loss_recovered']}; "
          f"SAELens {({k: theirs[v] for k, v in pairs.items()})}, ce {({k: theirs[v] for k, v in ce.items()})}, "
          f"score {theirs['ce_loss_score']}")
