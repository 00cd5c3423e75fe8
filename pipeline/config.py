"""Hydra wiring shared by every stage: typed dataclass schemas in Hydra's ConfigStore, extended by
the YAML files in conf/, turned back into dataclasses before a stage sees them."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

CONF_DIR = os.environ.get("PIPELINE_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


def stage_main(config_name: str, schema: type) -> Callable:
    """`@stage_main("cache", CacheConfig)` makes `run(cfg: CacheConfig)` a Hydra entry point."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)

    def wrap(run: Callable) -> Callable:
        @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
        @functools.wraps(run)
        def main(cfg) -> None:
            run(OmegaConf.to_object(cfg))
        return main
    return wrap
