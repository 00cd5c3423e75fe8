"""Hydra wiring shared by every stage: typed dataclass schemas in Hydra's ConfigStore, extended by
the YAML files in conf/, turned back into dataclasses before a stage sees them.

Two promises hold for every stage's command line (README.md, "Configuration and errors"):
- Every key is declared. A key that no schema dataclass declares, whether it comes from the command
  line (`key=`, `+key=`, `++key=`) or from a YAML file, is refused with the declared names closest
  to it, before the stage runs. Only dict-typed fields take keys of their own (free-form settings
  handed to another library: `deepspeed.overrides`, `storage_options`). A section whose dataclass a
  config group picks (AuditConfig.task: `audit/task=splitting`, see group_sections) declares the
  picked option's keys.
- A UserError (pipeline/errors.py) prints its one message and exits with USER_ERROR_EXIT; any other
  exception is a bug and shows its traceback. HYDRA_FULL_ERROR=1 shows user errors' tracebacks too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from pipeline.errors import USER_ERROR_EXIT, ConfigError, UserError

CONF_DIR = os.environ.get("PIPELINE_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


def stage_main(config_name: str, schema: type) -> Callable:
    """`@stage_main("cache", CacheConfig)` makes `run(cfg: CacheConfig)` a Hydra entry point."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)

    def wrap(run: Callable) -> Callable:
        @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
        def compose_and_run(cfg) -> None:
            # inside the job, so that Hydra does not log "Error executing job" before the message
            with user_errors_reported(config_name):
                # `+key=`, `++key=` and YAML keys reach here: OmegaConf.to_object would drop them
                from hydra.core.hydra_config import HydraConfig
                check_declared(OmegaConf.to_container(cfg, resolve=False), schema,
                               sections=group_sections(schema, HydraConfig.get().runtime.choices))
                run(OmegaConf.to_object(cfg))

        @functools.wraps(run)
        def main() -> None:
            with user_errors_reported(config_name):
                check_overrides(schema, sys.argv[1:])
            try:
                compose_and_run()
            except SystemExit as e:
                exit_now(e)
        return main
    return wrap


@contextmanager
def user_errors_reported(stage: str) -> Iterator[None]:
    """A UserError becomes its message on stderr and exit status USER_ERROR_EXIT; everything else,
    SystemExit included (the trainer's stop on a signal), passes through untouched."""
    try:
        yield
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's own switch for the full traceback
            raise
        # every rank of a torchrun job reports: the error may be one rank's own
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
        sys.stdout.flush()
        print(f"pipeline.{stage}{rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


def exit_now(e: SystemExit) -> None:
    """End a stage's process with `e`'s status. With a process group alive (a trainer), at once, its
    cleanup done (checkpoints and logs are written before SystemExit reaches here): finalising the
    interpreter tears gloo's threads down in static destructors, which now and then aborts the
    process ("terminate called without an active exception", status -6 instead of the error's 2)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        raise e
    import logging
    if e.code is not None and not isinstance(e.code, int):
        print(e.code, file=sys.stderr)  # what the interpreter would print for sys.exit("message")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)


def check_overrides(schema: type, args: list[str]) -> None:
    """Refuse plain `key=value` overrides of undeclared keys before Hydra composes anything: Hydra
    refuses them itself, but without close names (and suggests `+key=`). Config groups (`sae=relu_l1`,
    `plan/size=1m`: folders of conf/ or --config-dir) and Hydra's own keys are Hydra's to check,
    except the options of a group that picks a section's dataclass (group_sections): an unknown one,
    or the section set as a value (`task=splitting` for `audit/task=splitting`), is refused here.
    `+key=`/`++key=` are checked on the composed config (stage_main)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parsed = get_args_parser().parse_args(args)
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException:
        return  # a malformed override: Hydra's own message says what is wrong with it
    group_dirs = [d for d in (CONF_DIR, parsed.config_dir) if d]
    picked = {f.metadata["group"]: f for f in dataclasses.fields(schema) if "group" in f.metadata}
    tree: dict = {}
    choices: dict = {}
    for o in overrides:
        key = o.key_or_group
        if o.type == OverrideType.CHANGE and key in {f.name for f in picked.values()}:
            group, value = next(g for g, f in picked.items() if f.name == key), o.get_value_element_as_str()
            raise ConfigError(f"{key}={value} would set the section {key} itself; the config group {group} picks "
                              f"it. Fix: {group}={value} (and {key}.<key>=... for its settings)")
        if o.type == OverrideType.CHANGE and o.package is None and key in picked:
            value, options = o.value(), picked[key].metadata["options"]()
            if (isinstance(value, str) or value is None) and value not in options:
                close = difflib.get_close_matches(str(value), options, n=3)
                raise ConfigError(f"{key}={value} is not one of {list(options)}"
                                  + (f": did you mean {', '.join(close)}?" if close else ""))
            choices[key] = value if isinstance(value, str) else None  # a sweep: each job is checked on its own
        if (o.type != OverrideType.CHANGE or o.package is not None or "/" in key or key.split(".")[0] == "hydra"
                or any(Path(d, key).is_dir() for d in group_dirs)):
            continue
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})
    check_declared(tree, schema, sections=group_sections(schema, choices))


def group_sections(schema: type, choices: Mapping[str, str | None]) -> dict[str, type | None]:
    """The sections of `schema` whose dataclass a config group picks: fields declared as
    `field(metadata={"group": "audit/task", "options": f})`, f() -> {option: dataclass}, whose group's
    option files put their settings at the field (`# @package task`). Field name -> the dataclass of
    the option that `choices` (group -> option, as Hydra's runtime.choices) names for its group, or
    of the field's value in `schema()` when it names none; None (not checked) for a sweep."""
    out: dict[str, type | None] = {}
    for f in dataclasses.fields(schema):
        group = f.metadata.get("group")
        if group is None:
            continue
        if group not in choices:
            out[f.name] = type(getattr(schema(), f.name))
        else:
            choice = choices[group]
            out[f.name] = f.metadata["options"]().get(choice) if isinstance(choice, str) else None
    return out


def check_declared(tree: Mapping, schema: type, prefix: str = "",
                   sections: Mapping[str, type | None] | None = None) -> None:
    """Raise a ConfigError naming every key of the nested mapping `tree` that the dataclass
    `schema` does not declare (nested dataclasses are walked; dict fields take any key), with the
    declared names closest to each. `sections` (group_sections) gives the dataclass a config group
    picked for some of schema's fields (None: not checked)."""
    sections = dict(sections or {})
    unknown = list(_undeclared(tree, schema, prefix, sections))
    if not unknown:
        return
    declared = list(_declared(schema, prefix, sections))
    free = [p for p, t in declared if _is_dict(t)]
    lines = [f"{key}: {_suggest(key, [p for p, _ in declared])}{_other_option(schema, prefix, key)}" for key in unknown]
    picked = "".join(f", {prefix}{name}: {t.__qualname__} in {t.__module__.replace('.', '/')}.py"
                     for name, t in sections.items() if t is not None)
    raise ConfigError(
        "unknown config key(s), which would be silently ignored:\n  " + "\n  ".join(lines)
        + f"\nFix: use a declared key ({schema.__name__} in {schema.__module__.replace('.', '/')}.py{picked} and the "
        "configs of its sections document each)"
        + (f"; free-form keys belong under {', '.join(free)} only" if free else ""))


def _other_option(schema: type, prefix: str, key: str) -> str:
    """For a key unknown to the picked option of a group section: the options that declare it."""
    name, _, rest = key[len(prefix):].partition(".")
    f = next((f for f in dataclasses.fields(schema) if f.name == name and "group" in f.metadata), None)
    if f is None or not rest:
        return ""

    def declares(t: object, parts: list[str]) -> bool:
        for part in parts:
            if _is_dict(t):
                return True
            if not dataclasses.is_dataclass(t) or part not in _fields(t):
                return False
            t = _fields(t)[part]
        return True

    have = [f"{f.metadata['group']}={o}" for o, t in f.metadata["options"]().items() if declares(t, rest.split("."))]
    return f"; {key} is a key of {', '.join(have)}" if have else ""


def _fields(schema: type) -> dict[str, object]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _is_dict(t: object) -> bool:
    return t is dict or typing.get_origin(t) is dict


def _undeclared(tree: Mapping, schema: type, prefix: str, sections: Mapping | None = None) -> Iterator[str]:
    fields = {**_fields(schema), **(sections or {})}
    for key, value in tree.items():
        if key not in fields:
            yield f"{prefix}{key}"
        elif dataclasses.is_dataclass(fields[key]) and isinstance(value, Mapping):
            yield from _undeclared(value, fields[key], f"{prefix}{key}.")


def _declared(schema: type, prefix: str, sections: Mapping | None = None) -> Iterator[tuple[str, object]]:
    """(dotted path, type) of every field, sections and the fields inside them."""
    for name, t in {**_fields(schema), **(sections or {})}.items():
        yield f"{prefix}{name}", t
        if dataclasses.is_dataclass(t):
            yield from _declared(t, f"{prefix}{name}.")


def _suggest(key: str, declared: list[str]) -> str:
    """Declared keys close to `key`, by the whole path or by the last part alone (the right name in
    another section), then every key of its section (close names miss synonyms such as lr)."""
    section, _, leaf = key.rpartition(".")
    candidates = [p for p in declared if not key.startswith(p + ".")]  # not its own sections
    leaves = difflib.get_close_matches(leaf, {p.rpartition(".")[2] for p in candidates}, n=5)
    close = difflib.get_close_matches(key, candidates, n=5) + [p for p in candidates if p.rpartition(".")[2] in leaves]
    siblings = [p.rpartition(".")[2] for p in declared if p.rpartition(".")[0] == section]
    declares = f"{section or 'the top level'} declares {', '.join(siblings)}"
    if not close:
        return declares
    did = f"did you mean {', '.join(dict.fromkeys(close))}?"
    return f"{did} ({declares})" if section else did  # the top level's list would drown the answer
