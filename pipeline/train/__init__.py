"""Stage 2: train feature-sharded SAEs with DeepSpeed (python -m pipeline.train)."""

from pipeline.train.config import DataConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from pipeline.train.loop import train

__all__ = ["DataConfig", "DeepSpeedConfig", "OptimConfig", "TrainConfig", "train"]
