"""The audit's task registry (pipeline/audit/tasks): the registry, the config group audit/task and the
report list the same tasks; a task defined in this file (the module-level Config, run, render and
summary below) runs through pipeline.audit.run into audit.json and audit.html, and through Hydra's
composition with one option file, without another file changing; the task's keys on the command
line are checked against the picked task's Config, with close names; the old `task=<name>` says
what to type instead. Nothing here loads a model."""

from __future__ import annotations

import ast
import dataclasses
import html
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.analysis import InputConfig
from pipeline.audit import AuditConfig, TaskConfig
from pipeline.audit import report as audit_report
from pipeline.audit import run as audit
from pipeline.audit import tasks
from pipeline.config import CONF_DIR, check_declared, check_overrides, group_sections
from pipeline.errors import USER_ERROR_EXIT, ConfigError

ROOT = Path(__file__).resolve().parent.parent
AUDIT = ROOT / "pipeline" / "audit"


def compose(overrides: list[str]):
    """conf/audit.yaml composed with Hydra's compose API (as `python -m pipeline.audit overrides`)."""
    import pipeline.audit.__main__  # noqa: F401  (registers audit_schema, as the command line does)
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose("audit", overrides=overrides)


# --- a task of this file ---------------------------------------------------------------------------

@dataclass
class Config(TaskConfig):
    greeting: str = "hello"
    """What the task writes."""
    repeat: int = 2

    def __post_init__(self):
        if self.repeat < 1:
            raise ConfigError(f"task.repeat={self.repeat} must be >= 1. Fix: task.repeat=2")


LABEL = "throwaway check"


def run(cfg) -> dict:
    print("throwaway: working", flush=True)
    return {"greeting": cfg.task.greeting * cfg.task.repeat, "sae": cfg.input.checkpoint, "dashboard": cfg.dashboard}


def render(sec: dict, out_dir: Path) -> str:
    return f'<h2 id="throwaway">Throwaway</h2><p id="greeting">{html.escape(sec["greeting"])}</p>'


def summary(sec: dict) -> str:
    return f"throwaway: said {sec['greeting']}"


@pytest.fixture
def throwaway():
    """This module registered as the task `throwaway` (and unregistered afterwards)."""
    before = dict(tasks.TASKS)
    task = tasks.register(sys.modules[__name__], "throwaway")
    try:
        yield task
    finally:
        tasks.TASKS.clear()
        tasks.TASKS.update(before)


# --- the registry, the config group and the report --------------------------------------------------

def test_registry_group_options_and_report_sections_list_the_same_tasks(tmp_path, monkeypatch):
    names = list(tasks.TASKS)
    assert names == ["concepts", "splitting", "crossmodal", "neighbours", "completeness", "absorption", "autointerp"]
    assert tasks.DEFAULT == "concepts" and tasks.GROUP == "audit/task"
    # one module per task in pipeline/audit/tasks/, one option per task in conf/audit/task/
    assert {p.stem for p in (AUDIT / "tasks").glob("*.py") if not p.stem.startswith("_")} == set(names)
    assert {p.stem for p in Path(CONF_DIR, "audit", "task").glob("*.yaml")} == set(names)
    assert OmegaConf.load(Path(CONF_DIR, "audit.yaml")).defaults[2] == {"audit/task": tasks.DEFAULT}
    from hydra.core.config_store import ConfigStore
    assert set(names) <= {n.removesuffix(".yaml") for n in ConfigStore.instance().list(tasks.SCHEMA_GROUP)}
    for name, task in tasks.TASKS.items():
        assert dataclasses.is_dataclass(task.Config) and issubclass(task.Config, TaskConfig), name
        assert all(callable(f) for f in (task.run, task.render, task.summary)), name
        assert f"audit/task={name}" in (ROOT / "docs" / "audit.md").read_text(), name
    assert tasks.TASKS["autointerp"].Config.__name__ == "AutointerpConfig"
    # the report's sections are the registry's, in its order, each under its own id and label
    for name, task in tasks.TASKS.items():
        monkeypatch.setitem(tasks.TASKS, name, dataclasses.replace(
            task, render=lambda sec, out, name=name: f'<h2 id="{name}">{sec["n"]}</h2>'))
    doc = {"format": "pipeline.audit", "version": 1, **{n: {"n": i} for i, n in enumerate(reversed(names))}}
    page = audit_report.render(doc, tmp_path)
    assert [page.index(f'<h2 id="{n}">') for n in names] == sorted(page.index(f'<h2 id="{n}">') for n in names)
    nav = page[page.index('<div class="nav">'):page.index("</div>")]
    assert nav == '<div class="nav">' + "".join(f'<a href="#{n}">{html.escape(t.label)}</a>'
                                               for n, t in tasks.TASKS.items())
    # no task is named anywhere else: the stage, the report and the shared config iterate the registry
    for module in ("run.py", "report.py", "config.py", "__main__.py"):
        strings = {n.value for n in ast.walk(ast.parse((AUDIT / module).read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & set(names), (module, strings & set(names))


def test_a_task_defined_in_a_test_runs_through_the_stage(throwaway, tmp_path, capsys):
    assert throwaway.Config is Config and list(tasks.TASKS)[-1] == "throwaway"  # no ORDER: last
    out = tmp_path / "out"
    out.mkdir()
    # a section an earlier run wrote (of a task not registered now) is kept
    (out / "audit.json").write_text(json.dumps({"format": "pipeline.audit", "version": 1, "gone": {"x": 1}}))
    cfg = AuditConfig(task=Config(greeting="hi", repeat=3), input=InputConfig(checkpoint="runs/x"),
                      out_dir=str(out), dashboard=None)
    doc = audit(cfg)
    assert doc["throwaway"] == {"greeting": "hihihi", "sae": "runs/x", "dashboard": None}
    assert json.loads((out / "audit.json").read_text()) == doc and doc["gone"] == {"x": 1}
    page = (out / "audit.html").read_text()
    assert '<h2 id="throwaway">Throwaway</h2><p id="greeting">hihihi</p>' in page
    assert '<a href="#throwaway">throwaway check</a>' in page and "gone" not in page
    printed = capsys.readouterr().out
    assert printed.index("throwaway: working") < printed.index("throwaway: said hihihi  (")
    assert f"wrote {out / 'audit.json'}" in printed
    with pytest.raises(ConfigError, match=r"task.repeat=0 must be >= 1"):
        Config(repeat=0)
    # a Config of no registered task is refused, naming the tasks
    with pytest.raises(ConfigError, match=r"not the settings of an audit task.*throwaway"):
        AuditConfig(task=TaskConfig.__new__(type("Stray", (TaskConfig,), {})))


def test_a_task_defined_in_a_test_composes_with_one_option_file(throwaway, tmp_path):
    """The option file alone makes `audit/task=throwaway` and its keys work on Hydra's side."""
    extra = tmp_path / "conf" / "audit" / "task"
    extra.mkdir(parents=True)
    (extra / "throwaway.yaml").write_text("# @package task\ndefaults:\n  - /audit/task_schema/throwaway@_here_\n")
    overrides = ["audit/task=throwaway", "task.greeting=hey", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    composed = OmegaConf.to_object(compose(overrides))
    assert composed.task == Config(greeting="hey")
    check_overrides(AuditConfig, overrides[:2])
    with pytest.raises(ConfigError, match=r"task.greting: did you mean task.greeting, "):
        check_overrides(AuditConfig, ["audit/task=throwaway", "task.greting=hey"])


# --- the command line -------------------------------------------------------------------------------

def test_task_keys_are_checked_against_the_picked_task():
    check_overrides(AuditConfig, ["task.concepts=[water]", "task.top=3"])  # the default task: concepts
    check_overrides(AuditConfig, ["audit/task=splitting", "task.small=a", "task.large=b", "task.threshold=0.8"])
    check_overrides(AuditConfig, ["audit/task=crossmodal", "task.vlm.name=x", "task.data.split=test"])
    check_overrides(AuditConfig, ["audit/task=splitting,neighbours", "task.anything=1"])  # a sweep: each job checks
    cases = [
        (["audit/task=splitting", "task.smal=a"], r"task.smal: did you mean task.small"),
        (["audit/task=absorption", "task.absorption_words=300"], r"task.absorption_words: did you mean task.words\?"),
        (["task.small=a"], r"task.small: task declares concepts, top, .*; task.small is a key of audit/task=splitting"),
        (["audit/task=splittin"], r"audit/task=splittin is not one of \['concepts', .*did you mean splitting\?"),
        (["audit/task=crossmodal", "task.vlm.nam=x"], r"task.vlm.nam: did you mean task.vlm.name, "),
    ]
    for args, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            check_overrides(AuditConfig, args)
        assert ("is a key of" in str(e.value)) == (args == ["task.small=a"]), str(e.value)
    # the old spelling: one line saying what to type instead
    with pytest.raises(ConfigError) as e:
        check_overrides(AuditConfig, ["task=splitting", "small=a"])
    assert str(e.value) == ("task=splitting would set the section task itself; the config group audit/task picks it. "
                            "Fix: audit/task=splitting (and task.<key>=... for its settings)")
    # `+task.<key>=` reaches the composed config: checked there against the picked task
    cfg = compose(["audit/task=splitting", "+task.smal=a"])
    sections = group_sections(AuditConfig, {"audit/task": "splitting"})
    assert sections == {"task": tasks.TASKS["splitting"].Config}
    with pytest.raises(ConfigError, match=r"(?s)task.smal: did you mean task.small.*tasks/splitting.py"):
        check_declared(OmegaConf.to_container(cfg, resolve=False), AuditConfig, sections=sections)


def test_settings_that_need_the_shared_ones_are_checked_with_them():
    crossmodal = tasks.TASKS["crossmodal"].Config
    with pytest.raises(ConfigError, match=r"input.exclude_positions_below=4 < task.context_size=4"):
        AuditConfig(task=crossmodal(context_size=4), input=InputConfig(exclude_positions_below=4))
    AuditConfig(task=crossmodal(context_size=4), input=InputConfig(exclude_positions_below=3))
    assert type(AuditConfig().task) is tasks.TASKS["concepts"].Config


def test_the_cli_refuses_the_old_task_key_and_a_misspelt_added_key_in_one_line(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "PIPELINE_RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.audit", *args, f"out_dir={tmp_path / 'out'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    p = cli("task=splitting", "small=a")
    assert p.returncode == USER_ERROR_EXIT and p.stderr.count("\n") == 1, p.stderr[-3000:]
    assert p.stderr == ("pipeline.audit: ConfigError: task=splitting would set the section task itself; the config "
                        "group audit/task picks it. Fix: audit/task=splitting (and task.<key>=... for its settings)\n")
    p = cli("audit/task=splitting", "task.small=a", "task.large=b", "+task.smal=c")
    assert p.returncode == USER_ERROR_EXIT and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "task.smal: did you mean task.small" in p.stderr and not (tmp_path / "out").exists()
