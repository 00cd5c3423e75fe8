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
LOWER = ("pipeline.sae", "pipeline.store", "pipeline.errors", "pipeline.parallel")

# importer (less "pipeline.")   the other stages' modules it imports          what removes it (issue 16)
ALLOWED = """
audit.autointerp.report         interpret.dashboard                           # HTML page helpers -> analysis layer
audit.autointerp.run            evaluate.common evaluate.dictionary interpret.collect interpret.config
audit.autointerp.run            interpret.dashboard interpret.run             # audit tasks on a shared analysis layer
audit.completeness              evaluate.common                               # batching of held-out text
audit.crossmodal                cache.vision evaluate.config evaluate.dictionary evaluate.run publish.release
audit.neighbours                interpret.dashboard
audit.report                    interpret.dashboard
audit.run                       evaluate.dictionary interpret.dashboard
audit.search                    evaluate.common evaluate.dictionary interpret.search steer.run  # steering hook
audit.splitting                 evaluate.dictionary publish.release
evaluate.dictionary             publish.release                               # the adapter loads releases too
interpret.crosslingual          evaluate.dictionary                           # the dictionary adapter
interpret.run                   evaluate.common evaluate.dictionary
interpret.search                evaluate.common evaluate.dictionary
steer.run                       evaluate.dictionary
scaling.config                  plan.model                                    # planner terms on the architecture
scaling.run                     plan.model train.heldout
train.dry_run                   plan.model
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
    assert ("pipeline.steer.run", "pipeline.evaluate.dictionary") in STAGE_TO_STAGE


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
