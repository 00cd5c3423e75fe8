"""Configuration of the audit stage (`python -m pipeline.audit`, conf/audit.yaml): the settings every
task shares, and `task`, the picked task's own settings (conf/audit/task/<name>.yaml picks
pipeline/audit/tasks/<name>.py's Config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import demo
from pipeline.analysis.config import InputConfig
from pipeline.audit import tasks
from pipeline.audit.common import TaskConfig
from pipeline.errors import ConfigError


@dataclass
class AuditConfig:
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"group": tasks.GROUP, "options": tasks.configs})
    """The task and its settings: `audit/task=<name>` picks the task (concepts, splitting, crossmodal,
    neighbours, completeness, absorption, autointerp: pipeline/audit/tasks/<name>.py, whose Config
    documents every key), `task.<key>=...` sets them. Each task writes its own section of audit.json;
    sections of the other tasks already there are kept, and audit.html shows them all. In Python:
    AuditConfig(task=tasks.TASKS["splitting"].Config(small=..., large=...)); AuditConfig() (a bare
    TaskConfig) is the default task, concepts."""
    input: InputConfig = field(default_factory=InputConfig)
    """The dictionary (every task but splitting), its model and hook, and exclude_positions_below:
    positions below it are left out of the per-prompt max and mean (position 0 is BOS).
    pipeline/analysis/config.py."""
    dashboard: str | None = demo.INTERPRET
    """The interpretation stage's dashboard folder: features with a page there are linked (for
    audit/task=splitting: the small dictionary's dashboard). null or missing: no links."""
    out_dir: str = demo.AUDIT
    """audit.json and audit.html are written here."""

    def __post_init__(self):
        if isinstance(self.task, str):
            raise ConfigError(f"task={self.task!r} names a task; AuditConfig.task takes its settings. Fix: "
                              f"AuditConfig(task=tasks.TASKS[{self.task!r}].Config(...)); on the command line "
                              f"audit/task={self.task}. Tasks: {list(tasks.TASKS)}")
        if type(self.task) is TaskConfig:
            self.task = tasks.TASKS[tasks.DEFAULT].Config()
        tasks.task_of(self.task)  # the settings of a registered task, or a ConfigError naming the tasks
        self.task.check(self)
