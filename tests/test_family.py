"""The family corpus builder (alignment, split, sizes) on a constructed package tree, and the family
driver end to end on tiny sizes with a tiny model: every step's output, the report, and resumption."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import DataConfig, iter_documents
from pipeline.errors import ConfigError
from pipeline.family import FamilyConfig
from pipeline.family import corpus as C

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_FAMILYtestTOKEN0123456789"
WORDS = {"en": "the house is red and the sky is blue", "de": "das Haus ist rot und der Himmel ist blau",
         "es": "la casa es roja y el cielo es azul", "fr": "la maison est rouge et le ciel est bleu",
         "it": "la casa è rossa e il cielo è blu", "pt": "a casa é vermelha e o céu é azul"}


def _para(lang: str, f: int, i: int, untranslated: bool = False) -> str:
    text = WORDS["en" if untranslated else lang]
    return f'<div class="para">\n {text} <em>number</em> {i} of chapter {f}, long enough to keep.\n</div>'


def fake_packages(root: Path, n_files: int = 30, paras: int = 12) -> None:
    """A handbook in every HANDBOOK_LANGUAGES folder (chapter 0 with one paragraph fewer in German:
    not alignable; paragraph 1 of every chapter left in English by the Italian translators), a
    Debian Reference in the five languages and Python's reST sources."""
    hb = root / "usr/share/doc/debian-handbook/html"
    for folder, lang in C.HANDBOOK_LANGUAGES.items():
        for f in range(n_files):
            n = paras - 1 if (lang == "de" and f == 0) else paras
            body = "".join(_para(lang, f, i, untranslated=(lang == "it" and i == 1)) for i in range(n))
            (hb / folder).mkdir(parents=True, exist_ok=True)
            (hb / folder / f"chapter{f}.html").write_text(f"<html><body><div class='x'>{body}</div></body></html>")
    for lang in C.REFERENCE_LANGUAGES:
        d = root / f"usr/share/doc/debian-reference-{lang}/docs"
        d.mkdir(parents=True)
        for f in range(3):
            (d / f"ch0{f}.{lang}.html").write_text("".join(f"<p>{WORDS[lang]} reference {f}.{i}</p>" for i in range(5)))
    src = root / "usr/share/doc/python3.11/html/_sources/library"
    src.mkdir(parents=True)
    for f in range(4):
        (src / f"mod{f}.rst.txt").write_text("\n\n".join(f"Python paragraph {i} of module {f}." for i in range(20)))


class WordTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_corpus_alignment_split_and_sizes(tmp_path):
    fake_packages(tmp_path / "x")
    docs, parallel = C.collect(tmp_path / "x", None)
    dest = tmp_path / "corpus"
    m = C.write(dest, docs, parallel, {"packages": {}}, WordTokenizer())
    # sizes: the manifest's counts are the files' contents
    files = sorted((dest / "documents").glob("*.jsonl"))
    rows = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert m["total"]["documents"] == len(rows) == len(docs)
    assert m["total"]["chars"] == sum(len(r["text"]) for r in rows)
    assert m["total"]["tokens"] == sum(len(r["text"].split()) for r in rows)
    assert {r["source"] for r in rows} == {"handbook", "reference", "python-docs"}
    # untranslated paragraphs are not repeated in the language that left them in English
    it = [r["text"] for r in rows if r["source"] == "handbook" and r["lang"] == "it" and r["group"].endswith("/0")]
    assert it and not any(WORDS["en"] in t for t in it)
    # the split is by group: every translation of a passage is on the same side, through the data stage
    cfg = dict(source="files", path=[str(dest / "documents/*.jsonl")], test_fraction=C.TEST_FRACTION, shuffle_seed=None)
    by_text = {r["text"]: r["group"] for r in rows}
    train = {by_text[t] for t in iter_documents(DataConfig(split="train", **cfg))}
    test = {by_text[t] for t in iter_documents(DataConfig(split="test", **cfg))}
    assert train and test and not train & test and len(train | test) == len({r["group"] for r in rows})
    # parallel rows: test side only, aligned paragraph by paragraph, translated, never the misaligned chapter
    assert parallel and m["parallel_rows"] == len(parallel) == len((dest / "parallel.jsonl").read_text().splitlines())
    for p in parallel:
        assert p["group"] in test and "chapter0/" not in p["group"]
        numbers = {lang: p[lang].split("number")[1] for lang in C.PARALLEL_LANGUAGES}
        assert len(set(numbers.values())) == 1  # the same paragraph in every language
        assert all(p[x].startswith(WORDS[x]) for x in C.PARALLEL_LANGUAGES)
    assert not any(p["group"].startswith("handbook") and " 1 of chapter" in p["en"] for p in parallel)


def test_family_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="smallest first"):
        FamilyConfig(sizes=[256, 64])
    with pytest.raises(ConfigError, match="steps has"):
        FamilyConfig(steps=["cache", "bake"])
    with pytest.raises(ConfigError, match="prompt"):
        FamilyConfig(attribution_prompts=[{"prompt": "x"}])


@pytest.fixture
def hub():
    """A loopback Hugging Face Hub with one user, alice."""
    with HubServer(tokens={TOKEN: "alice"}) as server:
        yield server


def _tiny_family(tmp_path: Path, model_dir: Path, out: Path, train_args: str = '["batch_size=256"]'):
    """The tiny family's arguments (a corpus from constructed packages, two tiny sizes), and its
    parallel paragraphs."""
    fake_packages(tmp_path / "x", n_files=80, paras=16)
    docs, parallel = C.collect(tmp_path / "x", None)
    corpus = tmp_path / "corpus"
    C.write(corpus, docs, parallel, {"packages": {"test": "1"}}, WordTokenizer())
    return [f"model_name={model_dir}", "hook=model.layers.2", "sizes=[32,64]", "n_tokens=12000", "test_tokens=3000",
            "eval_tokens=2000", "interpret_tokens=3000", "max_pages=5", "completeness_documents=200",
            "checkpoint_every=20", f"corpus={corpus}", f"out_dir={out}", f"train_args={train_args}"], parallel


def test_a_trainer_stopped_by_a_signal_stops_the_family_and_resumes(tmp_path, tiny_model_dir):
    """A trainer that a signal stops (SIGTERM: checkpoint, status 0) is not taken for a finished size:
    the driver stops with the command that resumes it, and that command finishes the size."""
    out = tmp_path / "family"
    args, _ = _tiny_family(tmp_path, tiny_model_dir, out, '["batch_size=32", "log_every=1"]')  # 375 steps
    args += ["steps=[corpus,cache,train]"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PIPELINE_RUNS": str(tmp_path / "runs")}
    p = subprocess.Popen([sys.executable, "-m", "pipeline.family", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    log, trainer = [], None
    for line in p.stdout:  # its first logged step: signal handlers in place, a step to checkpoint
        log.append(line)
        if line.startswith("step=") and trainer is None:
            trainer = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            assert len(trainer) == 1, trainer
            os.kill(int(trainer[0]), signal.SIGTERM)
    p.wait(timeout=60)
    log = "".join(log)
    assert p.returncode != 0 and "stopped by a signal after step" in log, log[-3000:]
    assert "train 32 stopped before its end" in log and "train 64" not in log, log[-3000:]
    assert (out / "train/32/checkpoints/latest").exists() and not (out / "train/32/heldout.json").exists()
    p = subprocess.run([sys.executable, "-m", "pipeline.family", *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((out / "train/32/heldout.json").read_text())["n_features"] == 32


def test_family_end_to_end_on_tiny_sizes(tmp_path, tiny_model_dir, hub):
    """The driver on two tiny dictionaries of a tiny model: corpus from the constructed packages,
    every step, the report's sections, the release on a loopback Hub (one folder per size); then a
    rerun finds everything done and runs no stage again."""
    out = tmp_path / "family"
    args, parallel = _tiny_family(tmp_path, tiny_model_dir, out)
    args += ['attribution_prompts=[{prompt: "the house is", target: " red"}]',
             'sweep_args=["sae.n_features=8,16,32", "n_tokens=2048,4096,8192", "batch_size=256", "sae.k=4", '
             '"heldout_tokens=2000"]', 'publish_args=["repo_id=alice/family"]']
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PIPELINE_RUNS": str(tmp_path / "runs"), "HF_TOKEN": TOKEN,
           "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "-m", "pipeline.family", *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for n in (32, 64):
        held = json.loads((out / f"train/{n}/heldout.json").read_text())
        assert held["n_features"] == n and held["point"]["heldout_tokens"] == 3000  # every held-out row
        assert {"step-40", "step-46"} <= {p.name for p in (out / f"train/{n}/checkpoints").iterdir()}
        assert (out / f"evaluate/{n}/metrics.json").exists() and (out / f"interpret/{n}/crosslingual.json").exists()
        assert {"concepts", "neighbours", "completeness"} <= set(json.loads((out / f"audit/{n}/audit.json").read_text()))
        assert (out / f"attribute/{n}/0/attribute.json").exists()
    assert "splitting" in json.loads((out / "audit/32-64/audit.json").read_text())
    cross = json.loads((out / "interpret/64/crosslingual.json").read_text())
    assert cross["n_sentences"] == len(parallel) and "ci95" in cross["parallel_minus_mismatched"]
    report = (out / "report/results.md").read_text()
    scaling = json.loads((out / "sweep/scaling.json").read_text())
    assert scaling["n_points"] == 9 and "a = " in report and (out / "report/results/density_64.png").exists()
    for title in ("Reconstruction", "Scaling-law sweep", "splitting", "Completeness", "Multilingual", "Concept search",
                  "Neighbourhood", "computational intermediates", "Commands"):
        assert title in report, title
    assert "not run" not in report and (out / "report/results/size.png").exists()
    # the reading's statements are computed from the outputs
    fvu = [json.loads((out / f"train/{n}/heldout.json").read_text())["fvu"] for n in (32, 64)]
    trend = "falls" if fvu[1] < fvu[0] else "rises" if fvu[1] > fvu[0] else "is not monotone"
    assert f"held-out FVU {trend} with size: {fvu[0]:.4f} (32), {fvu[1]:.4f} (64)" in report
    assert report.index("## Reading") < report.index("## 1. Reconstruction")
    window = json.loads((out / "train/64/sae/cfg.json").read_text())["config"]["dead_tokens"]
    assert re.search(rf"\| 64 \|.*\| [0-9.]+% \({window:,}\) \| [0-9.]+% of [0-9,]+ \|", report)
    assert "python -m pipeline.train" in report and "sae.n_features=64" in report
    assert report.count("\n# train 64\n") == 1  # each step once, with its last command
    on_hub = hub.state.files("alice/family")
    for n in (32, 64):  # one folder per size, as written locally
        assert on_hub[f"model.layers.2-{n}/cfg.json"] == (out / f"release/model.layers.2-{n}/cfg.json").read_bytes()
    assert b"model.layers.2-64" in on_hub["README.md"]  # the card lists every size
    # resumed: a second run finds every output and starts no stage but the cheap cache check
    before = (out / "commands.sh").read_text()
    p = subprocess.run([sys.executable, "-m", "pipeline.family", *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    again = (out / "commands.sh").read_text()[len(before):]
    assert "pipeline.train" not in again and "pipeline.scaling" not in again and "pipeline.evaluate" not in again and "pipeline.audit" not in again
    # retrained: size 64's analyses (and the splitting that reads it) run again, size 32's do not
    shutil.rmtree(out / "train/64")
    p = subprocess.run([sys.executable, "-m", "pipeline.family", *args, "steps=[train,evaluate,interpret,audit,attribute]"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = [x for x in (out / "commands.sh").read_text()[len(before) + len(again):].splitlines() if x.startswith("# ")]
    assert steps == ["# train 64", "# evaluate 64", "# interpret 64", "# audit concepts 64", "# audit neighbours 64",
                     "# audit completeness 64", "# audit splitting 32->64", "# attribute 64 #0"], steps
