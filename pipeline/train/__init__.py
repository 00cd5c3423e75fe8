"""Stage 2: train feature-sharded SAEs with DeepSpeed (python -m pipeline.train)."""

from pipeline.train.config import ActivationDataConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from pipeline.train.loop import train

__all__ = ["ActivationDataConfig", "DeepSpeedConfig", "OptimConfig", "TrainConfig", "train"]
