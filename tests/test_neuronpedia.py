"""The release's Neuronpedia export (pipeline/publish/neuronpedia.py) against the format Neuronpedia
imports, hijohnnylin/neuronpedia at ebb8426f: the paths its importer reads
(apps/webapp/app/api/admin/import/route.ts), one JSON record per line with exactly the fields of its
own converter's dataclasses (utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py, less the
timestamps the database fills in), every column the database requires (apps/webapp/prisma/
schema.prisma: NOT NULL without a default) present and of its type, and the values that make a
dashboard: tokens with their activations, the maximum and where it is, the logit effects, the
density, explanations. From a real interpretation run on the tiny model, through publish."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline.interpret import InterpretConfig
from pipeline.interpret import run as interpret
from pipeline.analysis import InputConfig
from pipeline.data import DataConfig
from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.models import ModelConfig
from pipeline.publish import PublishConfig, run
from pipeline.publish.neuronpedia import NeuronpediaConfig
from pipeline.sae import SAEConfig, create, save

HOOK = "model.layers.1"
SOURCE_SET = "pl-res-64"
# Neuronpedia's dataclasses at ebb8426f (the converter's records), less createdAt/updatedAt
FORMAT = {
    "release.jsonl": {"name", "description", "creatorName", "creatorId", "visibility", "isNewUi", "featured",
                      "descriptionShort", "urls", "creatorEmail", "creatorNameShort", "defaultSourceSetName",
                      "defaultSourceId", "defaultUmapSourceIds"},
    "model.jsonl": {"id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension",
                    "visibility", "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers",
                    "neuronsPerLayer", "owner", "website"},
    "sourceset.jsonl": {"modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type",
                        "creatorName", "urls", "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange",
                        "defaultShowBreaks", "showDfa", "showCorrelated", "showHeadAttribution", "showUmap"},
    "source.jsonl": {"id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled", "inferenceHosts",
                     "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility",
                     "defaultOfModelId", "hasUmap", "hasUmapLogSparsity", "hasUmapClusters", "num_prompts",
                     "num_tokens_in_prompt", "dataset", "notes"},
    "features": {"modelId", "layer", "index", "creatorId", "maxActApprox", "hasVector", "vector", "vectorLabel",
                 "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues",
                 "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                 "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                 "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str",
                 "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                 "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                 "decoder_weights_dist", "sourceSetName"},
    "activations": {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
                    "values", "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue",
                    "lossValues", "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex",
                    "zIndices", "zValues"},
    "explanations": {"id", "modelId", "layer", "index", "description", "authorId", "embedding", "triggeredById",
                     "typeName", "explanationModelName", "notes"},
}
# schema.prisma's NOT NULL columns without a default, and the JSON type each must have
REQUIRED = {
    "features": {"modelId": str, "layer": str, "index": str},
    "activations": {"id": str, "index": str, "layer": str, "modelId": str, "maxValue": float,
                    "maxValueTokenIndex": int, "minValue": float, "creatorId": str, "tokens": list, "values": list},
    "explanations": {"id": str, "modelId": str, "layer": str, "index": str, "description": str, "authorId": str},
}


def records(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in text.decode().splitlines()]


@pytest.fixture(scope="module")
def interpreted(tiny_model_dir, text_dir, tmp_path_factory) -> Path:
    """An export, its interpretation (features.json, examples.jsonl) and an autointerp audit.json."""
    tmp = tmp_path_factory.mktemp("neuronpedia")
    sae = create(SAEConfig(architecture="topk", n_features=64, d_model=32, k=4))
    sae.reset_parameters(0)
    save(sae, tmp / "sae", meta={"hook": HOOK, "model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    inp = InputConfig(checkpoint=str(tmp / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=DataConfig(source="files", path=[str(text_dir / "*.txt")]), context_size=32,
                      n_tokens=32 * 8, batch_size=4)
    interpret(InterpretConfig(input=inp, top_k=4, n_samples=4, n_quantiles=2, context_before=5, context_after=2,
                              out_dir=str(tmp / "interpret"), crosslingual_in_dashboard=False, progress=False))
    (tmp / "audit").mkdir()
    (tmp / "audit" / "audit.json").write_text(json.dumps({"format": "pipeline.audit", "version": 1, "autointerp": {
        "judge": {"model": "judge-x"}, "features": [{"feature": 3, "explanation": "the word 'the'"},
                                                    {"feature": 7, "explanation": ""}]}}))
    return tmp


def publish(tmp: Path, out: str, **neuronpedia):
    return run(PublishConfig(checkpoints=[str(tmp / "sae")], eval_dirs=[""], require_metrics=False,
                             dashboard_dirs=[str(tmp / "interpret")], out_dir=str(tmp / out), repo_id="alice/saes",
                             dry_run=True, progress=False, neuronpedia=NeuronpediaConfig(**neuronpedia)))


def test_export_follows_neuronpedias_import_format(interpreted):
    res = publish(interpreted, "rel", source_set=SOURCE_SET, audit_dirs=[str(interpreted / "audit")])
    sae = res.folder / res.sae_ids[0]
    model, source = "smollm2-135m-instruct", f"1-{SOURCE_SET}"
    cfg = json.loads((sae / "cfg.json").read_text())
    assert cfg["metadata"]["neuronpedia_id"] == f"{model}/{source}"
    root = sae / "neuronpedia" / model / source
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert found == {"release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl", "features/batch-0.jsonl.gz",
                     "activations/batch-0.jsonl.gz", "explanations/batch-0.jsonl.gz"}
    manifest = json.loads((sae / "release.json").read_text())["files"]
    assert {f"neuronpedia/{model}/{source}/{f}" for f in found} <= set(manifest)

    rows = {}
    for name in found:
        kind = name.split("/")[0]
        rows[kind] = records(root / name)
        for r in rows[kind]:
            assert set(r) == FORMAT[kind], f"{name}: {set(r) ^ FORMAT[kind]}"
            for column, kind_of in REQUIRED.get(kind, {}).items():
                assert isinstance(r[column], kind_of), (name, column, r[column])
    for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
        assert len(rows[name]) == 1
    (src,) = rows["source.jsonl"]
    assert (src["id"], src["modelId"], src["setName"]) == (source, model, SOURCE_SET)
    assert (src["saelensRelease"], src["saelensSaeId"]) == ("alice/saes", res.sae_ids[0])
    assert json.loads(src["saelensConfig"]) == cfg
    assert rows["model.jsonl"][0]["id"] == model and rows["model.jsonl"][0]["instruct"] is True

    features = json.loads((interpreted / "interpret" / "features.json").read_text())["features"]
    assert [r["index"] for r in rows["features"]] == [str(f["index"]) for f in features]
    for r, f in zip(rows["features"], features):
        assert (r["layer"], r["frac_nonzero"], r["maxActApprox"]) == (source, f["density"], f["max_act"])
        assert r["pos_str"] == [t for t, _ in f["promoted"]] and r["neg_values"] == [v for _, v in f["suppressed"]]
    examples = [json.loads(line) for line in (interpreted / "interpret" / "examples.jsonl").read_text().splitlines()]
    assert len(rows["activations"]) == sum(len(e["top"]) for e in examples) > 0
    assert len({r["id"] for r in rows["activations"]}) == len(rows["activations"])
    for r in rows["activations"]:
        assert len(r["tokens"]) == len(r["values"]) and all(isinstance(t, str) for t in r["tokens"])
        assert r["maxValue"] == max(r["values"]) == r["values"][r["maxValueTokenIndex"]]
        assert r["minValue"] == min(r["values"]) and r["values"][r["qualifyingTokenIndex"]] > 0
    assert [(r["index"], r["description"]) for r in rows["explanations"]] == [("3", "the word 'the'")]

    # republishing gives the same bytes (no timestamps, stable ids)
    again = publish(interpreted, "rel2", source_set=SOURCE_SET, audit_dirs=[str(interpreted / "audit")])
    for name in found:
        assert (again.folder / res.sae_ids[0] / "neuronpedia" / model / source / name).read_bytes() == \
            (root / name).read_bytes(), name


def test_without_the_option_there_is_no_export_and_no_id(interpreted):
    res = publish(interpreted, "plain")
    sae = res.folder / res.sae_ids[0]
    assert json.loads((sae / "cfg.json").read_text())["metadata"]["neuronpedia_id"] is None
    assert not (sae / "neuronpedia").exists()


def test_bad_neuronpedia_settings_are_refused(interpreted):
    with pytest.raises(ConfigError, match="letters, digits"):
        NeuronpediaConfig(source_set="my set").check(1)
    with pytest.raises(ConfigError, match="source_set is not"):
        NeuronpediaConfig(audit_dirs=["x"]).check(1)
    with pytest.raises(InputNotFoundError, match="no autointerp audit"):
        publish(interpreted, "rel3", source_set=SOURCE_SET, audit_dirs=[str(interpreted)])
    with pytest.raises(InputNotFoundError, match="examples.jsonl.*Fix: run python -m pipeline.interpret"):
        run(PublishConfig(checkpoints=[str(interpreted / "sae")], eval_dirs=[""], require_metrics=False,
                          out_dir=str(interpreted / "rel4"), dry_run=True, neuronpedia=NeuronpediaConfig(source_set="x")))
