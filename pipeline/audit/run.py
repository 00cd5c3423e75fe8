"""The audit stage: run the picked task (pipeline/audit/tasks/<name>.py), write its section of
<out_dir>/audit.json (the other tasks' sections are kept) and audit.html (every section)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.analysis import html as H
from pipeline.audit.config import AuditConfig
from pipeline.audit.report import REPORT_FILE, write_report
from pipeline.audit.tasks import task_of

AUDIT_FILE = H.AUDIT_FILE
AUDIT_FORMAT = "pipeline.audit"
AUDIT_VERSION = 1


def run(cfg: AuditConfig) -> dict:
    task = task_of(cfg.task)
    out = Path(cfg.out_dir)
    t = time.time()
    section = task.run(cfg)
    doc = _read(out)
    doc.update({"format": AUDIT_FORMAT, "version": AUDIT_VERSION, task.name: section})
    out.mkdir(parents=True, exist_ok=True)
    H.write(out / AUDIT_FILE, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    report = write_report(doc, out)
    link_dashboard(doc, report)
    print(f"{task.summary(section)}  ({time.time() - t:.1f}s)\nwrote {out / AUDIT_FILE}\n"
          f"report: {report.resolve().as_uri()}", flush=True)
    return doc


def link_dashboard(doc: dict, report: Path) -> None:
    """Point the dashboard's index.html (of any section that names one) at the report, idempotently."""
    for dash in {sec["dashboard"] for sec in doc.values() if isinstance(sec, dict) and sec.get("dashboard")}:
        index = Path(dash) / H.INDEX_FILE
        if index.exists() and not H.set_audit_link(index, report):
            print(f"note: {index} predates the audit link; rerun python -m pipeline.interpret to get one", flush=True)


def _read(out: Path) -> dict:
    """The existing audit.json (the other tasks' sections are kept), or an empty document."""
    f = out / AUDIT_FILE
    if not f.exists():
        return {}
    doc = json.loads(f.read_text(encoding="utf-8"))
    return doc if doc.get("format") == AUDIT_FORMAT and doc.get("version") == AUDIT_VERSION else {}


__all__ = ["AUDIT_FILE", "REPORT_FILE", "run"]
