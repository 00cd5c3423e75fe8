"""audit.html: one static page (inline CSS, no script, no network) rendered from audit.json, with
the interpretation dashboard's styles and token highlighting; features link to their dashboard
pages when a dashboard folder was given. Each task renders its own section (its module's render);
this module puts them on one page, in the order of the registry (pipeline/audit/tasks)."""

from __future__ import annotations

import html
import os
from pathlib import Path

from pipeline.analysis import html as H
from pipeline.audit.tasks import TASKS

REPORT_FILE = "audit.html"

EXTRA_CSS = """<style>
.good{color:#1b7a3a;font-weight:600}.weak{color:#9a6700}.bad{color:#b3261e}
details{margin:4px 0 10px}summary{cursor:pointer;color:#1a5fb4}
td.words{font-size:12px}
</style>"""


def render(doc: dict, out_dir: Path) -> str:
    """The page: every task's section that audit.json holds, in the registry's order (a section of a
    task no longer registered is kept in audit.json but not shown)."""
    sections, nav = [], []
    for name, task in TASKS.items():
        if name in doc:
            sections.append(task.render(doc[name], out_dir))
            nav.append(f'<a href="#{name}">{html.escape(task.label)}</a>')
    dash = next((doc[k]["dashboard"] for k in TASKS if isinstance(doc.get(k), dict) and doc[k].get("dashboard")),
                None)
    if dash and (Path(dash) / H.INDEX_FILE).exists():
        rel = os.path.relpath((Path(dash) / H.INDEX_FILE).resolve(), out_dir.resolve()).replace(os.sep, "/")
        nav.insert(0, f'<a href="{html.escape(rel)}">&larr; feature dashboard</a>')
    body = (f'<div class="nav">{"".join(nav)}</div><h1>Dictionary audit</h1>'
            f'<p class="meta">audit.json holds every number shown here.</p>{EXTRA_CSS}' + "\n".join(sections))
    return H.page("Dictionary audit", body)


def write_report(doc: dict, out_dir: Path) -> Path:
    path = out_dir / REPORT_FILE
    H.write(path, render(doc, out_dir))
    return path
