"""Audit a dictionary: find the features of a concept and show the evidence; compare dictionaries.

    python -m pipeline.audit                                   # every shipped concept set
    python -m pipeline.audit task.concepts=[deception,water] task.top=3
    python -m pipeline.audit audit/task=splitting task.small=runs/sae-1k task.large=runs/sae-4k
    python -m pipeline.audit audit/task=neighbours             # decoder neighbours and a 2-D map
    python -m pipeline.audit audit/task=completeness task.categories=[animals]
    python -m pipeline.audit audit/task=absorption             # SAEBench's first-letter absorption

`audit/task=<name>` picks a task (pipeline/audit/tasks/<name>.py: its Config, run, render and
summary; the registry is pipeline.audit.tasks.TASKS), `task.<key>=` sets its settings.
Output: <out_dir>/audit.json (a section per task) and audit.html (static; links to the
interpretation dashboard's feature pages). See docs/audit.md."""

from pipeline.audit.common import TaskConfig, auroc, effect_size
from pipeline.audit.concepts import ConceptSet, ConceptSetError, load_concept_set, resolve_concept_sets, shipped
from pipeline.audit.config import AuditConfig
from pipeline.audit.run import AUDIT_FILE, REPORT_FILE, run
from pipeline.audit.search import rank_features, search_concept
from pipeline.audit.splitting import match_features, split_dictionaries
from pipeline.audit.tasks import TASKS

__all__ = ["AUDIT_FILE", "AuditConfig", "ConceptSet", "ConceptSetError", "REPORT_FILE", "TASKS", "TaskConfig", "auroc",
           "effect_size", "load_concept_set", "match_features", "rank_features", "resolve_concept_sets", "run",
           "search_concept", "shipped", "split_dictionaries"]
