"""Training E2 (two stages) and the CLIP-FT baseline: ``train(TrainConfig(...))``."""
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
