"""The audit tasks: one module each in this folder, found here. A task module exports

    Config    a dataclass subclassing pipeline.audit.common.TaskConfig: the task's settings only,
              validated in __post_init__ (a ConfigError names the bad value and the fix); its
              check(audit) method sees the shared settings (input, dashboard, out_dir) too
    run(cfg) -> dict               the task's section of audit.json (cfg: the AuditConfig, cfg.task
                                   its Config); it may print progress lines
    render(section, out_dir) -> str     its section of audit.html (an <h2 id="<name>"> first)
    summary(section) -> str        the closing line(s) printed once the section is written
    LABEL, ORDER (optional)        its link in audit.html's navigation, and where its section goes

and conf/audit/task/<name>.yaml makes it an option of the config group `audit/task` (the file picks
the Config registered here as its schema; tests/test_faults_config.py checks it sets nothing else).
Adding a task is adding those two files: audit.json, audit.html and the command line
(`python -m pipeline.audit audit/task=<name> task.<key>=...`) find it through TASKS.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from pipeline.audit.common import TaskConfig
from pipeline.errors import ConfigError

GROUP = "audit/task"
"""The config group that picks the task (conf/audit/task/<name>.yaml, `# @package task`)."""
SCHEMA_GROUP = "audit/task_schema"
"""Where each task's Config is registered in Hydra's ConfigStore (as <name>): its option file's schema."""
DEFAULT = "concepts"
"""The task of `python -m pipeline.audit` and of AuditConfig() (conf/audit.yaml picks the same)."""


@dataclass(frozen=True)
class Task:
    name: str
    Config: type
    run: Callable[..., dict]
    render: Callable[..., str]
    summary: Callable[[dict], str]
    label: str
    order: int


TASKS: dict[str, Task] = {}
"""name -> Task, in report order (ORDER, then name)."""


def register(module: ModuleType, name: str | None = None) -> Task:
    """Make `module` (Config, run, render, summary; LABEL and ORDER optional) the task `name`
    (default: the module's own name), and its Config the schema of the option audit/task=<name>."""
    from hydra.core.config_store import ConfigStore

    name = name or module.__name__.rpartition(".")[2]
    missing = [a for a in ("Config", "run", "render", "summary") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"audit task module {module.__name__} lacks {missing} (see {__name__})")
    config = module.Config
    if not (isinstance(config, type) and dataclasses.is_dataclass(config) and issubclass(config, TaskConfig)):
        raise TypeError(f"{module.__name__}.Config must be a dataclass subclassing {TaskConfig.__qualname__}")
    task = Task(name, config, module.run, module.render, module.summary, getattr(module, "LABEL", name),
                getattr(module, "ORDER", 1000))
    others = [t for t in TASKS.values() if t.name != name]
    same = [t.name for t in others if t.Config is config]
    if same:
        raise TypeError(f"{module.__name__}.Config is already the Config of the audit task {same[0]!r}")
    TASKS.clear()
    TASKS.update((t.name, t) for t in sorted([*others, task], key=lambda t: (t.order, t.name)))
    ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=config)
    return task


def task_of(config: TaskConfig) -> Task:
    """The task whose Config `config` is (AuditConfig.task)."""
    for task in TASKS.values():
        if type(config) is task.Config:
            return task
    raise ConfigError(f"task={config!r} is not the settings of an audit task: AuditConfig.task takes a task's "
                      "Config (pipeline/audit/tasks/<name>.py), e.g. AuditConfig(task=tasks.TASKS['splitting'].Config("
                      f"small=..., large=...)); on the command line audit/task=<name>. Tasks: {list(TASKS)}")


def configs() -> dict[str, type]:
    """name -> Config of every task (the options of AuditConfig.task: pipeline.config.group_sections)."""
    return {name: task.Config for name, task in TASKS.items()}


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            register(importlib.import_module(f"{__name__}.{info.name}"))


_discover()

__all__ = ["DEFAULT", "GROUP", "SCHEMA_GROUP", "TASKS", "Task", "configs", "register", "task_of"]
