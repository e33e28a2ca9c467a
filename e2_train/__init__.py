"""Training E2 (two stages) and the CLIP-FT baseline, apart from the model library (``e2_core``),
which never imports it: ``train(TrainConfig(...))`` opens the datasets by name, ``fit`` takes them."""
from .config import Stage, TrainConfig
from .loop import fit, train
from .methods import METHODS, CLIPFineTuning, E2Training, EntityFineTuning, TrainingMethod

__all__ = ["CLIPFineTuning", "E2Training", "EntityFineTuning", "METHODS", "Stage", "TrainConfig", "TrainingMethod", "fit", "train"]
