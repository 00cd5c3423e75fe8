"""The dictionary family, stage by stage: every step is the documented command of a stage, run as its
own process (the stages talk only through storage), appended to <out_dir>/commands.sh, and skipped
or resumed when its output is already there. An analysis counts as done only for the dictionaries it
read: <out_dir>/steps.json records, per step, a fingerprint of its inputs, so a size retrained since
(another recipe, other tokens) has its analyses run again instead of reported for the new weights."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline import heldout
from pipeline.errors import UserError
from pipeline.family.config import FamilyConfig
from pipeline.family.corpus import TEST_FRACTION

LANGUAGES = "[en,de,es,fr,it]"
LEDGER = "steps.json"


class StepFailed(UserError):
    pass


def _files(paths: tuple[Path, ...]) -> list[Path]:
    return [q for p in paths for q in (sorted(p.rglob("*")) if p.is_dir() else [p]) if q.is_file()]


def fingerprint(paths: tuple[Path, ...]) -> str:
    """The files a step read, by name, size and modification time: retraining a size changes it."""
    h = hashlib.sha256()
    for q in _files(paths):
        st = q.stat()
        h.update(f"{q.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class Family:
    """Paths of one family's outputs and the commands that make them."""

    def __init__(self, cfg: FamilyConfig):
        from pipeline.family.corpus import default_dir
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.corpus = Path(cfg.corpus) if cfg.corpus else default_dir()
        self.report = Path(cfg.report) if cfg.report else self.out / "report" / "results.md"
        self.train_store = self.out / "activations/train"
        self.test_store = self.out / "activations/test"
        self.env = {**os.environ, "PIPELINE_FAMILY_CORPUS": str(self.corpus.resolve())}

    def sae(self, n: int) -> Path:
        return self.out / "train" / str(n) / "sae"

    def dir(self, step: str, n: int | str) -> Path:
        return self.out / step / str(n)

    def model(self, prefix: str = "input.") -> str:
        return f"{prefix}model.name={self.cfg.model_name}"

    def _ledger(self) -> dict:
        p = self.out / LEDGER
        return json.loads(p.read_text()) if p.exists() else {}

    def _record(self, key: str, inputs: tuple[Path, ...]) -> None:
        ledger = {**self._ledger(), key: fingerprint(inputs)}  # re-read: drivers may share out_dir
        tmp = self.out / f".{LEDGER}.{os.getpid()}"
        tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
        tmp.replace(self.out / LEDGER)

    def fresh(self, key: str, output: Path, *inputs: Path) -> bool:
        """Whether step `key` made `output` from `inputs` as they are now. An output from before the ledger
        counts when it is newer than every input (and is recorded)."""
        if not output.exists():
            return False
        recorded = self._ledger().get(key)
        if recorded is not None:
            return recorded == fingerprint(inputs)
        newest = max((q.stat().st_mtime_ns for q in _files(inputs)), default=0)
        if output.stat().st_mtime_ns < newest:
            return False
        self._record(key, inputs)
        return True

    def run(self, step: str, module: str, *args: str, nproc: int = 1, inputs: tuple[Path, ...] = (),
            key: str | None = None) -> None:
        """Run a stage's command; once it succeeded, record its inputs' fingerprint under key (the step)."""
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", module, *args]
        shown = shlex.join(["python", *cmd[1:]])
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "commands.sh", "a") as f:
            f.write(f"# {step}\nPIPELINE_FAMILY_CORPUS={shlex.quote(str(self.corpus))} {shown}\n")
        print(f"[family] {step}: {shown}", flush=True)
        t = time.time()
        env = {**self.env, "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", "1")} if nproc > 1 else self.env
        if subprocess.run(cmd, env=env).returncode != 0:
            raise StepFailed(f"family step {step} failed: {shown}. Fix what it reported, then run the same "
                             "family command again: finished work is kept and the stages resume")
        if inputs:
            self._record(key or step, inputs)
        print(f"[family] {step}: done in {time.time() - t:.0f}s", flush=True)


def _progress(cfg: FamilyConfig) -> str:
    return f"progress={str(cfg.progress).lower()}"


def step_corpus(f: Family) -> None:
    if not (f.corpus / "manifest.json").exists():
        from pipeline.family.corpus import main
        main([str(f.corpus)])


def step_cache(f: Family) -> None:
    c = f.cfg
    f.run("cache test", "pipeline.cache", f.model(""), f"hooks=[{c.hook}]", "data=family", "data.split=test", f"n_tokens={c.test_tokens}",
          f"store.url={f.test_store}", _progress(c))
    f.run("cache train", "pipeline.cache", f.model(""), f"hooks=[{c.hook}]", "data=family", f"n_tokens={c.n_tokens}", f"store.url={f.train_store}",
          _progress(c))


def _trained(out: Path, c: FamilyConfig) -> bool:
    """Whether out holds the held-out metrics of a run of the family's tokens, written at its end."""
    try:
        point = (heldout.read(out) or {}).get("point", {})
    except ValueError:  # not JSON: the trainer evaluates again
        return False
    return (point.get("n_tokens"), point.get("heldout_tokens")) == (c.n_tokens, c.test_tokens)


def step_train(f: Family) -> None:
    c = f.cfg
    for n in c.sizes:
        out = f.out / "train" / str(n)
        if _trained(out, c):
            continue  # the trainer would skip it too, after loading; this saves the start-up
        # every held-out row: a feature that fires once per 100k tokens is rare, not dead, in a 65k dictionary
        f.run(f"train {n}", "pipeline.train", f"sae={c.architecture}", f"sae.n_features={n}",
              f"parallel.feature_parallel={c.nproc}", f"data.url={f.train_store}", f"n_tokens={c.n_tokens}",
              f"heldout_url={f.test_store}", f"heldout_tokens={c.test_tokens}", f"out_dir={out}",
              f"checkpoint_every={c.checkpoint_every}", _progress(c), *c.train_args, nproc=c.nproc)
        if not _trained(out, c):  # a signal stops the trainer with a checkpoint and status 0
            raise StepFailed(f"train {n} stopped before its end (no {out / heldout.HELDOUT_FILE}; a signal "
                             "checkpoints and stops it). Run the same family command again to resume it")


def step_sweep(f: Family) -> None:
    """Gao et al.'s sweep (sizes x token budgets, conf/sweep/gao.yaml) on the family's tokens, then its fit;
    the multirun skips finished points, so a rerun only finishes the sweep."""
    sweep = f.out / "sweep"
    if not (sweep / "scaling.json").exists():
        f.run("sweep", "pipeline.train", "+sweep=gao", f"data.url={f.train_store}", f"heldout_url={f.test_store}",
              f"hydra.sweep.dir={sweep}", *f.cfg.sweep_args)
        f.run("scaling fit", "pipeline.scaling", str(sweep))


def step_evaluate(f: Family) -> None:
    c = f.cfg
    for n in c.sizes:
        if not f.fresh(f"evaluate {n}", f.dir("evaluate", n) / "metrics.json", f.sae(n)):
            f.run(f"evaluate {n}", "pipeline.evaluate", f.model(), f"input.checkpoint={f.sae(n)}", "input/data=family",
                  f"input.n_tokens={c.eval_tokens}", f"out_dir={f.dir('evaluate', n)}", _progress(c),
                  inputs=(f.sae(n),))


def step_interpret(f: Family) -> None:
    c = f.cfg
    for n in c.sizes:
        if not f.fresh(f"interpret {n}", f.dir("interpret", n) / "crosslingual.json", f.sae(n)):
            f.run(f"interpret {n}", "pipeline.interpret", f.model(), f"input.checkpoint={f.sae(n)}", "input/data=family",
                  f"input.n_tokens={c.interpret_tokens}", f"max_pages={c.max_pages}",
                  f"parallel_file={f.corpus / 'parallel.jsonl'}", f"languages={LANGUAGES}",
                  f"out_dir={f.dir('interpret', n)}", _progress(c), inputs=(f.sae(n),))


def _audit_done(f: Family, key: str, out: Path, task: str, *inputs: Path) -> bool:
    p = out / "audit.json"
    return p.exists() and task in json.loads(p.read_text()) and f.fresh(key, p, *inputs)


def step_audit(f: Family) -> None:
    c = f.cfg
    # completeness counts concept names in the training text the store was cached from
    corpus = ["task.corpus.source=files", f"task.corpus.path=[{f.corpus / 'documents'}/*.jsonl]",
              f"task.corpus.test_fraction={TEST_FRACTION}", f"task.max_documents={c.completeness_documents}"]
    per_task = {"concepts": [], "neighbours": [], "completeness": corpus}
    for n in c.sizes:
        out, inputs = f.dir("audit", n), (f.sae(n), f.dir("interpret", n) / "features.json")
        for task, extra in per_task.items():
            if not _audit_done(f, f"audit {task} {n}", out, task, *inputs):
                f.run(f"audit {task} {n}", "pipeline.audit", f"audit/task={task}", f.model(), f"input.checkpoint={f.sae(n)}",
                      f"dashboard={f.dir('interpret', n)}", f"out_dir={out}", *extra, inputs=inputs)
    for small, large in zip(c.sizes, c.sizes[1:]):
        out, key = f.dir("audit", f"{small}-{large}"), f"audit splitting {small}->{large}"
        inputs = (f.sae(small), f.sae(large), f.dir("interpret", small) / "features.json",
                  f.dir("interpret", large) / "features.json")
        if not _audit_done(f, key, out, "splitting", *inputs):
            f.run(key, "pipeline.audit", "audit/task=splitting",
                  f"task.small={f.sae(small)}", f"task.large={f.sae(large)}",
                  f"task.large_dashboard={f.dir('interpret', large)}", f"dashboard={f.dir('interpret', small)}",
                  f"out_dir={out}", inputs=inputs)


def best_concept_feature(audit_json: Path) -> dict | None:
    """The concept-search feature with the highest held-out AUROC over every concept set, with the
    clamp multiple the audit steered it with."""
    sec = json.loads(audit_json.read_text()).get("concepts", {})
    found = [{"concept": c["name"], "clamp_multiple": sec["clamp_multiple"], **x}
             for c in sec.get("concepts", []) for x in c["features"]]
    return max(found, key=lambda x: x["heldout_auroc"], default=None)


def step_steer(f: Family) -> None:
    """A sample generation with each size's best concept feature clamped as the concepts audit clamps it
    (clamp_multiple x its max activation), beside the clean one."""
    for n in f.cfg.sizes:
        out, audit = f.dir("steer", n), f.dir("audit", n) / "audit.json"
        best = best_concept_feature(audit)
        if best is None or f.fresh(f"steer {n}", out / "generations.json", f.sae(n), audit):
            continue
        f.run(f"steer {n} ({best['concept']})", "pipeline.steer", f.model(), f"input.checkpoint={f.sae(n)}",
              f"features={f.dir('interpret', n) / 'features.json'}", f"clamp=[\"{best['feature']}:{best['clamp_multiple']:g}x\"]",
              f"out_dir={out}", inputs=(f.sae(n), audit), key=f"steer {n}")


def step_attribute(f: Family) -> None:
    c = f.cfg
    for n in c.sizes:
        for i, p in enumerate(c.attribution_prompts):
            out, inputs = f.dir("attribute", n) / str(i), (f.sae(n), f.dir("interpret", n) / "features.json")
            if not f.fresh(f"attribute {n} #{i}", out / "attribute.json", *inputs):
                f.run(f"attribute {n} #{i}", "pipeline.interpret", "task=attribute", f.model(), f"input.checkpoint={f.sae(n)}",
                      "input/data=family", f"prompt={json.dumps(p['prompt'])}", f"target={json.dumps(p['target'])}",
                      f"features={f.dir('interpret', n) / 'features.json'}", f"out_dir={out}", inputs=inputs)


def step_publish(f: Family) -> None:
    c = f.cfg
    lst = lambda paths: "[" + ",".join(str(p) for p in paths) + "]"  # noqa: E731
    f.run("publish", "pipeline.publish", f"checkpoints={lst(f.sae(n) for n in c.sizes)}",
          f"eval_dirs={lst(f.dir('evaluate', n) for n in c.sizes)}",
          f"dashboard_dirs={lst(f.dir('interpret', n) for n in c.sizes)}", f"out_dir={f.out / 'release'}",
          f"sae_ids={lst(f'{c.hook}-{n}' for n in c.sizes)}",
          "title=" + json.dumps(f"{c.model_name} {c.hook} dictionary family ({', '.join(map(str, c.sizes))} features)"),
          _progress(c), *c.publish_args)


def step_report(f: Family) -> None:
    from pipeline.family.report import write_report
    path = write_report(f)
    print(f"[family] report: {path}", flush=True)


STEP_FUNCTIONS = {"corpus": step_corpus, "cache": step_cache, "train": step_train, "sweep": step_sweep, "evaluate": step_evaluate,
                  "interpret": step_interpret, "audit": step_audit, "steer": step_steer, "attribute": step_attribute,
                  "publish": step_publish, "report": step_report}


def run(cfg: FamilyConfig) -> Path:
    f = Family(cfg)
    t = time.time()
    for step in cfg.steps:
        STEP_FUNCTIONS[step](f)
    print(f"[family] {len(cfg.steps)} steps in {time.time() - t:.0f}s; report in {f.report}", flush=True)
    return f.report
