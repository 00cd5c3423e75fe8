"""Nothing silent at the command line (issue 15): a key no config declares is refused with the names
closest to it, in every stage and every override form; a user error is one message and exit status
2, never a traceback (unless HYDRA_FULL_ERROR=1 asks for it); and the small cases the issue lists
(plan sizes, Hub repo ids, the evaluated hook) say what is wrong and how to fix it.

Subprocesses run the real entry points, in cases that fail fast: before any model is loaded, except
the evaluate case, which loads the tiny model."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import CONF_DIR, check_declared, check_overrides, group_sections, user_errors_reported
from pipeline.errors import USER_ERROR_EXIT, ConfigError

ROOT = Path(__file__).resolve().parent.parent
STAGES = sorted(p.parent.name for p in (ROOT / "pipeline").glob("*/__main__.py"))


def cli(stage: str, *args: str, tmp_path: Path, env: dict | None = None,
        launcher: tuple = ()) -> subprocess.CompletedProcess:
    """`python -m pipeline.<stage> args` with Hydra's run folders under tmp_path (HYDRA_FULL_ERROR only
    when `env` sets it)."""
    full = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full.update(PIPELINE_RUNS=str(tmp_path / "runs"), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *launcher, "-m", f"pipeline.{stage}", *args], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == USER_ERROR_EXIT, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "Error executing job" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr[-3000:])


# -- unknown keys ------------------------------------------------------------------------------------

def test_every_stage_is_covered():
    assert {"audit", "cache", "evaluate", "interpret", "plan", "publish", "scaling", "steer", "train"} <= set(STAGES)
    for stage in STAGES:  # the refusal and the one-message errors live in stage_main
        assert "stage_main(" in (ROOT / "pipeline" / stage / "__main__.py").read_text(), stage


@pytest.mark.parametrize("stage", STAGES)
def test_added_keys_are_refused_in_every_stage(stage, tmp_path):
    """`+key=` and `++key=` reach the composed config (Hydra accepts both); both are named."""
    key = first_key(stage)
    p = cli(stage, f"+{key}x=1", "++totally.unknown=1", tmp_path=tmp_path)
    assert_user_error(p, "unknown config key", f"{key}x: did you mean {key}", "totally: ")
    assert "the top level declares" in p.stderr  # nothing is close to `totally`: every key is listed


@pytest.mark.parametrize("stage, override, expected", [
    ("train", "+optim.learning_rate=1e-3", "optim declares lr, "),  # the two (+ as Hydra suggests)
    ("train", "+sae.kk=2", "sae.kk: did you mean sae.k, sae.k_aux?"),
    ("plan", "gpu_memry_gb=40", "gpu_memry_gb: did you mean gpu_memory_gb?"),  # plain: refused before Hydra
])
def test_an_unknown_key_is_refused_with_close_names(stage, override, expected, tmp_path):
    assert_user_error(cli(stage, override, tmp_path=tmp_path), expected)


def test_plain_overrides_are_checked_against_every_schema_before_hydra_runs():
    """Hydra refuses `key=` for an undeclared key itself, but without close names; check_overrides
    answers first. Groups and Hydra's own keys are left to Hydra."""
    for stage in STAGES:
        schema = OmegaConf.get_type(_compose(stage, []))
        check_overrides(schema, ["hydra.run.dir=x", "hydra/job_logging=none", "--multirun"])
        key = first_key(stage)
        with pytest.raises(ConfigError, match=f"{key}x: did you mean {key}"):
            check_overrides(schema, [f"{key}x=1,2"])  # a sweep too
    from pipeline.train import TrainConfig
    check_overrides(TrainConfig, ["sae=relu_l1", "sae.k=8", "deepspeed.overrides.x=1", "data.storage_options.a=1"])
    with pytest.raises(ConfigError, match=r"lr: did you mean optim\.lr\?"):
        check_overrides(TrainConfig, ["lr=1e-3"])  # the right name in the wrong section


def test_the_dict_escape_takes_any_key(tmp_path):
    """deepspeed.overrides (and storage_options) hand free-form settings to another library: an added
    key passes the check, and the stage goes on (here to the missing store, a user error)."""
    p = cli("train", "+deepspeed.overrides.wall_clock_breakdown=true", "+data.storage_options.anon=true",
            f"data.url={tmp_path / 'no-store'}", tmp_path=tmp_path)
    assert_user_error(p, "no-store")
    assert "unknown config key" not in p.stderr


def _compose(stage: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    importlib.import_module(f"pipeline.{stage}.__main__")  # registers <stage>_schema
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(stage, overrides=overrides)


def first_key(stage: str) -> str:
    """A key the stage's schema declares (a typo of it must be answered with it)."""
    return dataclasses.fields(OmegaConf.get_type(_compose(stage, [])))[0].name


def _group_choices():
    """(stage, overrides) for every option of every config group a stage's defaults list names,
    and every sweep preset of the training stage."""
    for stage in STAGES:
        yield stage, []
        for entry in OmegaConf.load(Path(CONF_DIR) / f"{stage}.yaml").defaults:
            group = next(iter(entry)) if not isinstance(entry, str) else None
            if group and not group.startswith(("override", "hydra")):
                for option in sorted(Path(CONF_DIR, group).glob("*.yaml")):
                    yield stage, [f"{group}={option.stem}"]
    for preset in sorted(Path(CONF_DIR, "sweep").glob("*.yaml")):
        yield "train", [f"+sweep={preset.stem}"]


def test_every_key_the_shipped_yaml_sets_is_declared():
    seen = 0
    for stage, overrides in _group_choices():
        cfg = _compose(stage, overrides)
        schema = OmegaConf.get_type(cfg)
        choices = dict(o.split("=", 1) for o in overrides if "/" in o.split("=", 1)[0])  # as Hydra's runtime.choices
        check_declared(OmegaConf.to_container(cfg, resolve=False), schema, sections=group_sections(schema, choices))
        seen += 1
    assert seen >= len(STAGES) + 10


# -- one source of defaults (issue 16) ---------------------------------------------------------------

# What a stage's YAML may still set besides `defaults:` and `hydra:`, and why. Everything else is a
# default, and defaults live in the stage's dataclass only.
YAML_KEYS = {
    # TrainConfig's default (out_dir=None: runs/demo/train/<sae.architecture>) spelled as an
    # interpolation, so that Hydra's saved config names the folder
    "train": {"out_dir"},
    # EvalConfig's default input.data.split=test, restated because it must win over the split the
    # picked input/data group option sets (input/data=files and input/data=hf set split=all)
    "evaluate": {"input"},
}
# The key that names a config group's option; every other key an option sets must differ from the
# dataclass default (an option sets only what makes it that option).
GROUP_IDENTITY = {"data": "source", "model": "name", "sae": "architecture",
                  "plan/target": "d_model", "plan/size": "n_features"}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_defaults_have_one_source(stage):
    """`python -m pipeline.<stage>` with no overrides composes the stage's dataclass constructed with no
    arguments (`evaluate(EvalConfig())` is `python -m pipeline.evaluate`), and conf/<stage>.yaml sets
    nothing but Hydra's own sections and the YAML_KEYS exceptions."""
    cfg = _compose(stage, [])
    composed = OmegaConf.to_object(cfg)
    assert composed == OmegaConf.get_type(cfg)()
    yaml = OmegaConf.load(Path(CONF_DIR) / f"{stage}.yaml")
    assert set(yaml) - {"defaults", "hydra"} == YAML_KEYS.get(stage, set())
    if stage == "evaluate":
        assert OmegaConf.to_container(yaml.input) == {"data": {"split": "test"}}
        assert composed.input.data.split == "test" and composed.input.exclude_norm_factor == 8.0
    if stage == "train":
        assert composed.data.exclude_norm_factor == 8.0 and composed.out_dir == "runs/demo/train/topk"
    if stage == "audit":  # conf/audit.yaml's audit/task default and AuditConfig()'s are the same task
        from pipeline.audit.tasks import DEFAULT, TASKS
        assert type(composed.task) is TASKS[DEFAULT].Config


@pytest.mark.parametrize("sae", sorted(p.stem for p in Path(CONF_DIR, "sae").glob("*.yaml")))
def test_training_defaults_have_one_source(sae):
    """Each sae group option composes `TrainConfig(sae=SAEConfig(**what the option sets))`; out_dir
    follows the architecture in both."""
    from pipeline.sae import SAEConfig
    from pipeline.train import TrainConfig
    composed = OmegaConf.to_object(_compose("train", [f"sae={sae}"]))
    option = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR, "sae", f"{sae}.yaml")))
    dataclass = TrainConfig(sae=SAEConfig(**option))
    assert composed.out_dir == dataclass.out_dir == f"runs/demo/train/{sae}"
    assert composed == dataclass


def test_group_options_set_only_what_differs_from_the_dataclass():
    from pipeline.data import DataConfig
    from pipeline.models import ModelConfig
    from pipeline.cost_model import PlanConfig
    from pipeline.sae import SAEConfig
    defaults = {"data": DataConfig(), "model": ModelConfig(), "sae": SAEConfig(),  # the plan presets set sae.*
                "plan/target": PlanConfig().sae, "plan/size": PlanConfig().sae}
    groups = {str(p.parent.relative_to(CONF_DIR)) for p in Path(CONF_DIR).glob("*/**/*.yaml")}
    aliases = {"input/model", "input/data"}  # the analysis stages' input.model and input.data: the same options
    schemas = {"audit/task"}  # each option picks its own schema dataclass: the next test
    assert groups - {"sweep", "sweep/launcher"} - aliases - schemas == set(GROUP_IDENTITY)  # sweeps are experiments
    for alias in aliases:
        group = alias.split("/")[1]
        assert {p.name for p in Path(CONF_DIR, alias).glob("*.yaml")} == {p.name for p in Path(CONF_DIR, group).glob("*.yaml")}
        for option in Path(CONF_DIR, alias).glob("*.yaml"):
            assert OmegaConf.to_container(OmegaConf.load(option)) == {"defaults": [f"/{group}/{option.stem}@_here_"]}
    for group, identity in GROUP_IDENTITY.items():
        for option in sorted(Path(CONF_DIR, group).glob("*.yaml")):
            values = OmegaConf.to_container(OmegaConf.load(option))
            assert identity in values, option
            repeated = {k: v for k, v in values.items() if k != identity and v == getattr(defaults[group], k)}
            assert not repeated, f"{option} repeats the dataclass defaults {repeated}"


def test_the_planner_takes_the_trainers_step_sections():
    """PlanConfig declares no training field again: it extends the step sections TrainConfig extends
    (pipeline/step.py), and what it adds are the planner's own fields, none of them a step key."""
    from pipeline.cost_model import PlanConfig
    from pipeline.step import StepConfig
    from pipeline.train import TrainConfig
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert issubclass(PlanConfig, StepConfig) and issubclass(TrainConfig, StepConfig)
    assert names(PlanConfig) & names(TrainConfig) == names(StepConfig)
    types = {f.name: f.type for f in dataclasses.fields(StepConfig)}
    assert {f.name: f.type for f in dataclasses.fields(PlanConfig) if f.name in types} == types
    leaves = {f.name for section in dataclasses.fields(StepConfig) if dataclasses.is_dataclass(section.type)
              for f in dataclasses.fields(section.type)} | names(StepConfig)
    assert not (names(PlanConfig) - names(StepConfig)) & leaves


def test_audit_task_options_pick_their_schema_and_set_only_what_differs_from_it():
    """conf/audit/task/<name>.yaml: `# @package task`, the task's Config (registered in the ConfigStore
    by pipeline.audit.tasks) as its schema, and no key that repeats that dataclass's default; picking
    it composes exactly that Config."""
    from pipeline.audit.tasks import SCHEMA_GROUP, TASKS
    options = sorted(Path(CONF_DIR, "audit", "task").glob("*.yaml"))
    assert {p.stem for p in options} == set(TASKS)
    for option in options:
        assert option.read_text().startswith("# @package task\n"), option
        values = OmegaConf.to_container(OmegaConf.load(option))
        assert values.pop("defaults") == [f"/{SCHEMA_GROUP}/{option.stem}@_here_"], option
        schema = OmegaConf.to_container(OmegaConf.structured(TASKS[option.stem].Config))
        assert set(values) <= set(schema), option
        repeated = {k: v for k, v in values.items() if v == schema[k]}
        assert not repeated, f"{option} repeats the dataclass defaults {repeated}"
        composed = _compose("audit", [f"audit/task={option.stem}"])
        assert OmegaConf.get_type(composed.task) is TASKS[option.stem].Config
        assert OmegaConf.to_container(composed.task) == schema | values


def test_scaling_plan_keys_are_the_planners():
    from pipeline.scaling import ScalingConfig
    ScalingConfig(plan={"gpu_memory_gb": 80, "tflops": 400})
    with pytest.raises(ConfigError, match=r"plan\.gpu_memry_gb: did you mean plan\.gpu_memory_gb"):
        ScalingConfig(plan={"gpu_memry_gb": 80})


# -- user errors: one message, exit 2; tracebacks only on request -----------------------------------

def test_a_user_error_is_one_message_and_hydra_full_error_shows_the_traceback(tmp_path):
    p = cli("plan", "gpu_memory_gb=0", tmp_path=tmp_path)
    assert_user_error(p, "pipeline.plan: ConfigError: gpu_memory_gb=0.0 must be positive")
    assert p.stderr.count("\n") == 1  # the one line, nothing else
    full = cli("plan", "gpu_memory_gb=0", tmp_path=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "gpu_memory_gb=0.0 must be positive" in full.stderr
    full = cli("plan", "gpu_memry_gb=0", tmp_path=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "did you mean gpu_memory_gb" in full.stderr


def test_only_user_errors_are_shortened():
    """SystemExit (the trainer's exit on a signal, whatever its status) and bugs pass through."""
    with pytest.raises(SystemExit) as e, user_errors_reported("train"):
        sys.exit(75)
    assert e.value.code == 75
    with pytest.raises(KeyError), user_errors_reported("train"):
        raise KeyError("a bug keeps its traceback")
    with pytest.raises(SystemExit) as e, user_errors_reported("train"):
        raise ConfigError("bad")
    assert e.value.code == USER_ERROR_EXIT


def test_every_torchrun_rank_reports_a_user_error_and_the_job_fails(tmp_path):
    p = cli("train", "sae.kk=2", tmp_path=tmp_path,
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"))
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr
    # Each rank checks its own command line and reports. torchrun stops the other ranks as soon as one
    # fails, so on a loaded machine a rank may be stopped before it got that far: then torchrun says so.
    reported = [r for r in (0, 1) if f"pipeline.train (rank {r} of 2): ConfigError: unknown config key" in p.stderr]
    assert reported, p.stderr[-3000:]
    assert len(reported) == 2 or "closing signal SIGTERM" in p.stderr, p.stderr[-3000:]


# -- the small cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["gpu_memory_gb", "sae.d_model", "sae.n_features", "batch_size", "gpus_per_node",
                                 "tflops", "usable_fraction", "inter_node_gbs", "data.shuffle_buffer"])
def test_plan_sizes_must_be_positive(key):
    from dataclasses import replace

    from pipeline.plan import PlanConfig
    section, _, name = key.rpartition(".")
    for bad in (0, -1, float("nan")):
        with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')}="):
            if section:  # a training section's field (pipeline/step.py), checked by its own dataclass or the planner
                PlanConfig(**{section: replace(getattr(PlanConfig(), section), **{name: bad})})
            else:
                PlanConfig(**{key: bad})


def test_plan_bounds():
    from pipeline.plan import PlanConfig
    from pipeline.sae import SAEConfig
    from pipeline.train import DeepSpeedConfig
    for kw, match in [(lambda: {"usable_fraction": 1.5}, r"usable_fraction=1.5 must be in \(0, 1\]"),
                      (lambda: {"sae": SAEConfig(d_model=4096, k=0)}, r"sae\.k=0 must be in \[1, n_features="),
                      (lambda: {"max_gpus": -1}, "max_gpus=-1 must be >= 0"),
                      (lambda: {"sae": SAEConfig()}, r"sae\.d_model is not set.*Fix: sae\.d_model=<width>, or plan/target="),
                      (lambda: {"deepspeed": DeepSpeedConfig(zero_stage=0)},  # auto plans bf16 (GPUs), which the
                       r"deepspeed\.precision=bf16 with deepspeed\.zero_stage=0.*Fix:")]:  # trainer refuses at ZeRO-0
        with pytest.raises(ConfigError, match=match):
            PlanConfig(**kw())
    # k does not apply to relu_l1; 0s mean "auto"
    PlanConfig(sae=SAEConfig(architecture="relu_l1", k=0, feature_tile=0, d_model=4096), data_parallel=0)


@pytest.mark.parametrize("repo_id, rule", [("alice/bad name", "alphanumeric"), ("alice/x--y", "--"),
                                           ("alice/x.git", ".git"), ("-alice/x", "cannot start or end")])
def test_a_repo_id_the_hub_refuses_is_refused_before_anything_is_written(repo_id, rule):
    from pipeline.publish import PublishConfig
    with pytest.raises(ConfigError, match="is not a name the Hub accepts") as e:
        PublishConfig(repo_id=repo_id, dry_run=True)
    assert repr(repo_id) in str(e.value) and rule in str(e.value) and "Fix:" in str(e.value)


def test_a_dry_run_publish_validates_the_repo_id(tmp_path):
    p = cli("publish", "dry_run=true", "repo_id='alice/x--y'", f"out_dir={tmp_path / 'rel'}", tmp_path=tmp_path)
    assert_user_error(p, "repo_id='alice/x--y' is not a name the Hub accepts", "Cannot have -- or ..")
    assert not (tmp_path / "rel").exists()


def test_evaluate_names_where_a_missing_hook_came_from(tiny_model_dir, tmp_path):
    """The SAE's cfg.json records the store's hook; this model has no such module: the message says
    where the name came from, that the module is absent, what is close, and the fix."""
    from pipeline.sae import SAEConfig, create, save
    save(create(SAEConfig(architecture="topk", n_features=64, d_model=32, k=4)), tmp_path / "sae",
         meta={"hook": "model.layers.15", "model": {"id": "someone/else"}})
    p = cli("evaluate", f"input.checkpoint={tmp_path / 'sae'}", f"input.model.name={tiny_model_dir}", "input.model.device=cpu",
            f"out_dir={tmp_path / 'eval'}", tmp_path=tmp_path)
    assert_user_error(p, "reads hook 'model.layers.15' (recorded in its cfg.json: the hook of the activation store",
                      "has no module of that name", "model.layers.0 ... model.layers.3", "did you mean model.layers.1",
                      "Fix:", "hook=")
