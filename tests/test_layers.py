"""The layers of pipeline/ (issue 16), read from the source with ast: nothing is imported or run.

The lower layer (sae, store, errors, parallel) imports no stage. A stage imports no other stage,
except through the imports in ALLOWED below: the code the analysis stages share has no home of its
own yet. Issue 16 removes them; the list must only shrink. A new stage-to-stage import fails
test_no_new_stage_to_stage_import: put the shared code in a lower layer instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pipeline"
STAGES = {"cache", "train", "evaluate", "interpret", "steer", "audit", "publish", "plan", "scaling"}
LOWER = ("pipeline.sae", "pipeline.store", "pipeline.errors", "pipeline.parallel", "pipeline.cost_model",
         "pipeline.heldout", "pipeline.step", "pipeline.demo")

# importer (less "pipeline.")   the other stages' modules it imports          what removes it (issue 16)
ALLOWED = """
"""
ALLOWED_PAIRS = {(f"pipeline.{words[0]}", f"pipeline.{b}") for line in ALLOWED.splitlines()
                 if (words := line.split("#")[0].split()) for b in words[1:]}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The pipeline modules (or packages) `name` imports, anywhere in its code (function level too)."""
    package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..y import z
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m == "pipeline" or m.startswith("pipeline.")}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def in_layer(module: str, *layers: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


STAGE_TO_STAGE = {(m, i) for m in MODULES for i in imports(m) if stage(m) and stage(i) and stage(i) != stage(m)}


def test_the_graph_is_read():
    assert {"pipeline.sae.checkpoint", "pipeline.store.format", "pipeline.audit.run"} <= set(MODULES)
    assert "pipeline.sae.base" in imports("pipeline.sae.checkpoint")
    assert "pipeline.analysis.dictionary" in imports("pipeline.steer.run")


def test_the_lower_layer_imports_no_stage():
    found = sorted(f"{m} -> {i}" for m in MODULES if in_layer(m, *LOWER) for i in imports(m) if stage(i))
    assert not found, found


def test_sae_imports_nothing_above_it():
    """pipeline.sae.load reads an export without pulling in a stage (nor the Hub client through one)."""
    found = sorted(f"{m} -> {i}" for m in MODULES if in_layer(m, "pipeline.sae") for i in imports(m)
                   if not in_layer(i, "pipeline.sae", "pipeline.errors", "pipeline.parallel"))
    assert not found, found


def test_no_new_stage_to_stage_import():
    new = sorted(f"{m} -> {i}" for m, i in STAGE_TO_STAGE - ALLOWED_PAIRS)
    assert not new, (f"new imports between stages: {new}. A stage imports only lower layers (sae, store, models, "
                     "parallel, errors, config); put what stages share there (issue 16), not in ALLOWED")


def test_the_allow_list_only_shrinks():
    gone = sorted(f"{m} -> {i}" for m, i in ALLOWED_PAIRS - STAGE_TO_STAGE)
    assert not gone, f"these imports are gone: remove them from ALLOWED in {Path(__file__).name}: {gone}"


# Modules that import each other (directly or through others), each group one line; issue 16
# removes them, the list must only shrink.
KNOWN_CYCLES = """
"""
KNOWN = {frozenset(f"pipeline.{m}" for m in line.split()) for line in KNOWN_CYCLES.splitlines() if line.split()}
GRAPH = {m: {i for i in imports(m) if i in MODULES and i != m} for m in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for i in GRAPH[todo.pop()] - seen:
            seen.add(i)
            todo.append(i)
    return seen


def import_cycles() -> set[frozenset[str]]:
    """The groups of modules that reach each other through imports (strongly connected, 2+ modules).
    A package counts as its __init__ only: importing a submodule does not import its package here."""
    reach = {m: reachable(m) for m in GRAPH}
    return {frozenset(n for n in reach[m] if m in reach[n]) for m in GRAPH if m in reach[m]}


def test_the_cycle_finder_finds_cycles(monkeypatch):
    monkeypatch.setitem(GRAPH, "pipeline.sae.base", GRAPH["pipeline.sae.base"] | {"pipeline.sae.checkpoint"})
    assert frozenset({"pipeline.sae.base", "pipeline.sae.checkpoint"}) in import_cycles()


def test_no_import_cycle():
    """No module imports itself through others: pipeline.sae and its checkpoint, or the trainer's
    loop and its dry run, once did."""
    cycles = import_cycles()
    new = sorted(sorted(c) for c in cycles - KNOWN)
    assert not new, f"import cycles: {new}. Fix: move what both sides need into a module below both"
    gone = sorted(sorted(c) for c in KNOWN - cycles)
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES in {Path(__file__).name}: {gone}"
