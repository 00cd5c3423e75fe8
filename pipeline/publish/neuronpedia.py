"""A release's Neuronpedia export: per SAE folder, the files Neuronpedia's importer reads for one
source, under <sae_id>/neuronpedia/<model_id>/<layer>-<source_set>/:

    release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl   one record each
    features/batch-<n>.jsonl.gz       one record per feature (table Neuron): density, max activation,
                                      the logit effects (pos_str/pos_values, neg_str/neg_values)
    activations/batch-<n>.jsonl.gz    one record per top-activating example (table Activation)
    explanations/batch-<n>.jsonl.gz   one record per explanation, when an autointerp audit is given

Followed: hijohnnylin/neuronpedia at FOLLOWED_COMMIT. Its importer (apps/webapp/app/api/admin/import/
route.ts, lib/db/import.ts) reads exactly these paths and inserts each record's keys that are columns
of the table; each record here has the fields of the dataclass Neuronpedia's own converter writes
(utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py, FIELDS below) but createdAt and
updatedAt, which the database fills in: a republished release stays byte-identical. Batch files hold
BATCH features (and their examples and explanations), gzip-compressed with no timestamp.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.analysis.collect import EXAMPLES_FILE, FEATURES_FILE
from pipeline.analysis.html import AUDIT_FILE
from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.publish.inputs import hub_id, transformer_lens_name

FOLLOWED_COMMIT = "ebb8426fc550ad5d1f76d52c271a624af3c08a57"
EXPORT_DIR = "neuronpedia"
BATCH = 1024
"""Features per batch file, as Neuronpedia's own exporter (export-data.py) writes them."""
FIELDS = {
    "release": ("name", "description", "creatorName", "creatorId", "visibility", "isNewUi", "featured",
                "descriptionShort", "urls", "creatorEmail", "creatorNameShort", "defaultSourceSetName",
                "defaultSourceId", "defaultUmapSourceIds"),
    "model": ("id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension", "visibility",
              "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers", "neuronsPerLayer", "owner",
              "website"),
    "sourceset": ("modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type",
                  "creatorName", "urls", "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange",
                  "defaultShowBreaks", "showDfa", "showCorrelated", "showHeadAttribution", "showUmap"),
    "source": ("id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled", "inferenceHosts",
               "saelensConfig", "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility",
               "defaultOfModelId", "hasUmap", "hasUmapLogSparsity", "hasUmapClusters", "num_prompts",
               "num_tokens_in_prompt", "dataset", "notes"),
    "features": ("modelId", "layer", "index", "creatorId", "maxActApprox", "hasVector", "vector", "vectorLabel",
                 "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues",
                 "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                 "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                 "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str",
                 "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                 "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                 "decoder_weights_dist", "sourceSetName"),
    "activations": ("id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values",
                    "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "lossValues",
                    "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex", "zIndices",
                    "zValues"),
    "explanations": ("id", "modelId", "layer", "index", "description", "authorId", "embedding", "triggeredById",
                     "typeName", "explanationModelName", "notes"),
}
"""Each file's record fields (Neuronpedia's db_models at FOLLOWED_COMMIT, less createdAt/updatedAt)."""
NOT_COMPUTED = tuple(k for k in FIELDS["features"] if k.startswith(
    ("topkCosSim", "neuron_alignment_", "correlated_", "freq_hist_", "logits_hist_", "decoder_weights_")))
"""Feature fields we have no figures for: empty lists, which Neuronpedia shows as nothing."""


NEURONPEDIA_DEFAULT_CREATOR = "clkht01d40000jv08hvalcvly"
"""The user a Neuronpedia instance creates at setup (its webapp's DEFAULT_CREATOR_USER_ID default,
seeded by prisma/seed.ts): every record needs an existing user as its creator."""


@dataclass
class NeuronpediaConfig:
    """A Neuronpedia export in each SAE folder (docs/saelens.md), from
    the interpretation stage's features.json and examples.jsonl in its dashboard_dirs entry."""

    source_set: str | None = None
    """Neuronpedia's source set (letters, digits, dots, dashes), e.g. pipeline-res-4k: the SAE's Neuronpedia id
    is <model_id>/<layer>-<source_set>, written to cfg.json's metadata.neuronpedia_id. None: no export."""
    model_id: str | None = None
    """Neuronpedia's id of the model; default: the model's Hub name, lowercased (smollm2-135m-instruct)."""
    release: str | None = None
    """Neuronpedia's release name; default: source_set."""
    creator_id: str = NEURONPEDIA_DEFAULT_CREATOR
    """The Neuronpedia user every record names as its creator (it must exist where it is imported)."""
    creator_name: str = "pipeline"
    audit_dirs: list[str] = field(default_factory=list)
    """The out_dir of `pipeline.audit audit/task=autointerp` for each checkpoint (same order; an empty
    entry: none): its audit.json's explanations are exported too. Empty: no explanations."""

    def check(self, n_checkpoints: int) -> None:
        for name in ("source_set", "model_id", "release"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", value):
                raise ConfigError(f"neuronpedia.{name}={value!r}: Neuronpedia ids are letters, digits, dots and "
                                  "dashes, e.g. neuronpedia.source_set=pipeline-res-4k")
        if self.audit_dirs and len(self.audit_dirs) != n_checkpoints:
            raise ConfigError(f"neuronpedia.audit_dirs has {len(self.audit_dirs)} entries for {n_checkpoints} "
                              "checkpoints; give one per checkpoint (an empty entry for none), or none at all")
        if self.audit_dirs and self.source_set is None:
            raise ConfigError("neuronpedia.audit_dirs is set but neuronpedia.source_set is not: the explanations go "
                              "into a Neuronpedia export. Fix: set neuronpedia.source_set=<name>")


class NeuronpediaExport:
    """The export of one SAE: its settings and where its feature data comes from."""

    def __init__(self, cfg: NeuronpediaConfig, dashboard: Path | None, audit: Path | None, checkpoint: str,
                 repo_id: str | None, path_in_repo: str):
        if dashboard is None or not (dashboard / EXAMPLES_FILE).is_file():
            raise InputNotFoundError(
                f"neuronpedia.source_set is set, but checkpoint {checkpoint!r} has no interpretation output with "
                f"{EXAMPLES_FILE} (dashboard_dirs entry: {str(dashboard) if dashboard else 'none'}). Fix: run python "
                f"-m pipeline.interpret input.checkpoint={checkpoint} out_dir=<folder> and pass dashboard_dirs=[<folder>]")
        self.cfg, self.dashboard, self.audit = cfg, dashboard, audit
        self.repo_id, self.prefix = repo_id, f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""

    def ids(self, doc: dict) -> tuple[str, str]:
        """(Neuronpedia model id, source id) of the SAE whose exported config is `doc`."""
        name = hub_id(doc) or str((doc.get("model") or {}).get("id") or "model")
        model = self.cfg.model_id or re.sub(r"[^a-z0-9.-]+", "-", name.rsplit("/", 1)[-1].lower()).strip("-")
        layer = re.match(r"blocks\.(\d+)\.", transformer_lens_name(doc) or "")
        return model, f"{layer.group(1) if layer else 0}-{self.cfg.source_set}"

    def neuronpedia_id(self, doc: dict) -> str:
        """SAELens's metadata.neuronpedia_id: <model id>/<source id>."""
        return "/".join(self.ids(doc))

    def write(self, sae_folder: Path, doc: dict, saelens_cfg: dict) -> None:
        model, source = self.ids(doc)
        out = sae_folder / EXPORT_DIR / model / source
        features = json.loads((self.dashboard / FEATURES_FILE).read_text(encoding="utf-8"))
        common = {"modelId": model, "layer": source, "creatorId": self.cfg.creator_id}
        for name, record in self._metadata(model, source, sae_folder.name, doc, saelens_cfg, features).items():
            _jsonl(out / f"{name}.jsonl", [record], name)
        rows = {"features": [_feature(f, common, self.cfg.source_set) for f in features["features"]],
                "activations": [], "explanations": []}
        with open(self.dashboard / EXAMPLES_FILE, encoding="utf-8") as lines:
            for line in lines:
                e = json.loads(line)
                rows["activations"] += [_activation(x, rank, e["index"], common) for rank, x in enumerate(e["top"])]
        rows["explanations"] = self._explanations(common)
        for name, records in rows.items():
            for start in range(0, len(features["features"]), BATCH):
                batch = [r for r in records if start <= int(r["index"]) < start + BATCH]
                if batch:
                    _jsonl(out / name / f"batch-{start // BATCH}.jsonl.gz", batch, name)

    def _metadata(self, model: str, source: str, sae_id: str, doc: dict, saelens_cfg: dict, features: dict) -> dict:
        c, hub = self.cfg, hub_id(doc)
        release = c.release or c.source_set
        urls = [f"https://huggingface.co/{self.repo_id}"] if self.repo_id else []
        folder = f"{self.prefix}{sae_id}" if self.repo_id else None
        described = f"{doc['architecture']} SAE, {doc['n_features']} features, on {doc.get('hook')} (pipeline)"
        return {
            "release": {"name": release, "description": f"Sparse autoencoders published with pipeline: {release}",
                        "creatorName": c.creator_name, "creatorId": c.creator_id, "visibility": "PUBLIC",
                        "isNewUi": False, "featured": False, "descriptionShort": release, "urls": urls,
                        "creatorEmail": None, "creatorNameShort": c.creator_name, "defaultSourceSetName": c.source_set,
                        "defaultSourceId": source, "defaultUmapSourceIds": []},
            "model": {"id": model, "instruct": bool(re.search(r"instruct|-it$|chat", model)), "creatorId": c.creator_id,
                      "displayNameShort": model, "displayName": hub or model, "tlensId": None,
                      "dimension": doc["d_model"], "visibility": "PUBLIC", "defaultSourceSetName": c.source_set,
                      "defaultSourceId": source, "inferenceEnabled": False, "layers": 0, "neuronsPerLayer": 0,
                      "owner": hub.split("/")[0] if hub else "", "website": f"https://huggingface.co/{hub}" if hub else None},
            "sourceset": {"modelId": model, "name": c.source_set, "creatorId": c.creator_id, "hasDashboards": True,
                          "visibility": "PUBLIC", "description": described, "type": "", "creatorName": c.creator_name,
                          "urls": urls, "creatorEmail": None, "releaseName": release, "defaultOfModelId": None,
                          "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                          "showHeadAttribution": False, "showUmap": False},
            "source": {"id": source, "modelId": model, "setName": c.source_set, "creatorId": c.creator_id,
                       "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [],
                       "saelensConfig": json.dumps(saelens_cfg, sort_keys=True), "saelensRelease": self.repo_id,
                       "saelensSaeId": folder, "hfRepoId": self.repo_id, "hfFolderId": folder, "visibility": "PUBLIC",
                       "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
                       "num_prompts": features["n_tokens"] // features["context_size"],
                       "num_tokens_in_prompt": features["context_size"],
                       "dataset": json.dumps(features["data"], sort_keys=True), "notes": None}}

    def _explanations(self, common: dict) -> list[dict]:
        """The autointerp audit's explanations (audit.json's autointerp section), if one was given."""
        if self.audit is None:
            return []
        path = self.audit / AUDIT_FILE
        section = json.loads(path.read_text(encoding="utf-8")).get("autointerp") if path.is_file() else None
        if not section:
            raise InputNotFoundError(f"neuronpedia.audit_dirs entry {str(self.audit)!r} holds no autointerp audit "
                                     f"({path} has no autointerp section). Fix: run python -m pipeline.audit "
                                     f"audit/task=autointerp out_dir={self.audit}, or leave the entry empty")
        note = f"pipeline.audit autointerp, judge {section['judge']['model']}"
        return [{"id": _id("explanation", common, f["feature"], f["explanation"]), "modelId": common["modelId"],
                 "layer": common["layer"], "index": str(f["feature"]), "description": f["explanation"],
                 "authorId": common["creatorId"], "embedding": None, "triggeredById": None,
                 # typeName and explanationModelName name rows of Neuronpedia's own tables: left empty
                 "typeName": None, "explanationModelName": None, "notes": note}
                for f in section["features"] if f.get("explanation")]


def _feature(f: dict, common: dict, source_set: str) -> dict:
    return {**common, "index": str(f["index"]), "maxActApprox": f["max_act"], "hasVector": False, "vector": [],
            "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
            **{k: [] for k in NOT_COMPUTED},
            "neg_str": [t for t, _ in f["suppressed"]], "neg_values": [v for _, v in f["suppressed"]],
            "pos_str": [t for t, _ in f["promoted"]], "pos_values": [v for _, v in f["promoted"]],
            "frac_nonzero": f["density"], "sourceSetName": source_set}


def _activation(x: dict, rank: int, index: int, common: dict) -> dict:
    values = x["acts"]
    top = max(range(len(values)), key=values.__getitem__)
    return {"id": _id("activation", common, index, rank), "tokens": x["tokens"], "index": str(index),
            "layer": common["layer"], "modelId": common["modelId"], "maxValue": values[top],
            "maxValueTokenIndex": top, "minValue": min(values), "values": values, "creatorId": common["creatorId"],
            "dataSource": None, "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
            "lossValues": [], "logitContributions": None, "binMin": None, "binMax": None, "binContains": None,
            "qualifyingTokenIndex": x["center"], "zIndices": None, "zValues": None}


def _id(kind: str, common: dict, *parts) -> str:
    """A stable primary key (Neuronpedia's own are 25-character cuids): the same release, the same ids."""
    key = "/".join(map(str, (kind, common["modelId"], common["layer"], *parts)))
    return "pl" + hashlib.sha256(key.encode()).hexdigest()[:23]


def _jsonl(path: Path, records: list[dict], name: str) -> None:
    assert all(set(r) == set(FIELDS[name]) for r in records), f"{name}: not Neuronpedia's fields"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text, compresslevel=5, mtime=0) if path.suffix == ".gz" else text)
