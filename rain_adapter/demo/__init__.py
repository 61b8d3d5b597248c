"""A toy world trained on the CPU in minutes (base, LRM, ITM as ordinary HF Qwen2 checkpoints), where
RAIN and the baseline merges can be measured end to end: ``rain demo`` (:mod:`rain_adapter.demo.run`)."""

from .train import WorldConfig, WorldPaths, ci_config, ensure_world, world_home

__all__ = ["WorldConfig", "WorldPaths", "ci_config", "ensure_world", "world_home"]
