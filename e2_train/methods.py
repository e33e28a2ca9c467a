"""Training methods: each owns the model it trains, its forward pass and its loss, and says what
trains in each stage, so the loop never asks which model it holds.

* :class:`E2Training`: E2 on a CLIP (stage 1: E2's new parts; stage 2: everything), the global and
  regional contrastive losses, the Gumbel temperature annealed over each stage.
* :class:`CLIPFineTuning`: the CLIP-FT baseline, CLIP's contrastive loss on the same global texts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import torch
from open_clip.model import CLIP
from torch import nn

from e2_core import E2Config, E2Model, Encoder
from e2_core.fusion import TemperatureSchedule
from e2_core.loss import RegionalContrastiveLoss, contrastive_loss
from e2_core.model import encode_texts, is_e2_parameter, text_tower

from e2_core.registry import TRAINING_METHOD_GROUP, Registry

from . import distributed
from .config import Stage, TrainConfig


class TrainingMethod(nn.Module):
    """The model being trained and its objective. ``forward(batch)`` gives this process's features
    (what DDP wraps); :meth:`loss` gathers them from every process and scores them. A new method is one
    module and one line in the ``e2_plugins.training_methods`` entry-point group (``--method NAME``)."""

    name: str = ""
    default_stages: Tuple[Stage, ...] = ()
    #: the TrainConfig settings only this method trains with (a run folder resumes only with the same values)
    own_settings: Tuple[str, ...] = ()

    def __init__(self, model: CLIP, cfg: TrainConfig, entities: Tuple[str, ...] = (), arch=None):
        super().__init__()
        self.model, self.arch = model, arch

    @classmethod
    def start(cls, encoder: Encoder, cfg: TrainConfig, entities: Tuple[str, ...] = ()) -> "TrainingMethod":
        """The method on the model of ``encoder`` (the run's starting point)."""
        return cls(encoder.model, cfg, entities, encoder.arch)

    def encoder(self) -> Encoder:
        """The model being trained, as an encoder (evaluation, checkpoints)."""
        return Encoder(self.model, arch=self.arch)

    def set_stage(self, stage: Stage) -> None:
        """Freeze what ``stage`` does not train."""
        for name, param in self.model.named_parameters():
            param.requires_grad_(stage.trains != "new" or self.is_new(name))

    def is_new(self, name: str) -> bool:
        """Whether a parameter is one the method adds to the CLIP it starts from."""
        return False

    def on_step(self, step: int, total: int) -> Dict[str, float]:
        """Called before each optimizer step of a stage; returns values to log."""
        return {}

    def parameter_groups(self, weight_decay: float, new_lr: Optional[float] = None) -> List[Dict]:
        """Trainable parameters, with no weight decay on norms, biases, scales, embeddings and
        selection tokens (as open_clip's trainer excludes 1-d tensors); with ``new_lr``, the parts
        the method adds form their own groups at that learning rate."""
        exempt = no_weight_decay(self.model)
        kinds = [(True, False), (False, False)] + ([(True, True), (False, True)] if new_lr is not None else [])
        groups = {kind: [] for kind in kinds}  # (decays, added part): decayed first, as checkpoints expect
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups[param.ndim >= 2 and name not in exempt, new_lr is not None and self.is_new(name)].append(param)
        return [{"params": params, "weight_decay": weight_decay if decays else 0.0, **({"lr": new_lr} if new else {})}
                for (decays, new), params in groups.items()]

    def loss(self, features: Dict[str, torch.Tensor], ctx, sizes) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def no_weight_decay(model: nn.Module) -> Set[str]:
    """Names of the 2-d tensors that are embeddings rather than weights."""
    names = {"positional_embedding", "token_embedding.weight", "visual.positional_embedding",
             "visual.class_embedding"}
    if hasattr(model.visual, "no_weight_decay"):
        names |= {f"visual.{name}" for name in model.visual.no_weight_decay()}
    return names


class E2Training(TrainingMethod):
    """E2: CLIP plus selection tokens and fusion blocks, trained with the global and regional losses."""

    name = "e2"
    own_settings = ("token_attention", "tokens_per_entity", "fusion_layers", "gumbel_tau", "gumbel_tau_end",
                    "gumbel_noise_end", "pick_carry", "centre_positions", "patch_sharing_weight",
                    "fade_patches")
    # stage 2: the added parts keep stage 1's learning rate (new_lr), ten times the CLIP's (see the README)
    default_stages = (Stage("stage1", lr=5e-4, epochs=5.0, trains="new"),
                      Stage("stage2", lr=5e-5, epochs=20.0, trains="all", new_lr=5e-4))

    def __init__(self, model: CLIP, cfg: TrainConfig, entities: Tuple[str, ...] = (), arch=None):
        """``entities``: the dataset's tag entities; a CLIP gets E2 parts for exactly these."""
        if not isinstance(model, E2Model):
            config = E2Config(token_attention=cfg.token_attention, tokens_per_entity=cfg.tokens_per_entity,
                              fusion_layers=cfg.fusion_layers, gumbel_tau=cfg.gumbel_tau,
                              gumbel_tau_end=cfg.gumbel_tau_end, gumbel_noise_end=cfg.gumbel_noise_end,
                              pick_carry=cfg.pick_carry, centre_positions=cfg.centre_positions)
            model = E2Model(model, config.replace(entities=tuple(entities)) if entities else config, arch)
        elif entities and tuple(entities) != model.entities:
            raise ValueError(f"the start is an E2 model with entities {list(model.entities)}, but the dataset's "
                             f"entities are {list(entities)}; start from a CLIP or use a dataset with those entities")
        super().__init__(model, cfg, entities, arch)
        self.fade_patches, self.fading = cfg.fade_patches, False
        self.objective = RegionalContrastiveLoss(model.entities, cfg.global_weight, cfg.entity_weights,
                                                multi_positive=cfg.multi_positive,
                                                patch_sharing_weight=cfg.patch_sharing_weight)

    def is_new(self, name: str) -> bool:
        return is_e2_parameter(name)

    def set_stage(self, stage: Stage) -> None:
        super().set_stage(stage)
        self.fading = self.fade_patches and stage.trains == "new"

    def on_step(self, step: int, total: int) -> Dict[str, float]:
        config = self.model.config
        tau = TemperatureSchedule(config.gumbel_tau, config.gumbel_tau_end, total)(step)
        noise = TemperatureSchedule(1.0, config.gumbel_noise_end, total)(step)
        self.model.set_gumbel_temperature(tau, noise)
        gate = TemperatureSchedule(1.0, 0.0, total)(step) if self.fading else 0.0
        self.model.visual.set_patch_gate(gate)
        return {"tau": tau, "gumbel_noise": noise, **({"patch_gate": gate} if self.fading else {})}

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        return {**self.model(batch.images, batch.text, batch.entity_text), "entity_labels": batch.entity_text.index}

    def loss(self, features, ctx, sizes) -> Dict[str, torch.Tensor]:
        return regional_objective(self.objective, features, ctx, sizes)


def regional_objective(objective: RegionalContrastiveLoss, features: Dict[str, torch.Tensor], ctx,
                       sizes) -> Dict[str, torch.Tensor]:
    """The global and regional losses of every process's features (E2's objective)."""
    labels = features.pop("entity_labels")
    gathered = {k: distributed.gather(features[k], ctx, sizes) for k in
                ("image_features", "text_features", "image_regional_features", "entity_text_features")}
    # entity string ids are per process: offset them so that no two processes share one
    labels = distributed.gather(labels + ctx.rank * 1_000_000, ctx, sizes)
    # the patch-sharing penalty is a mean over images: this process's own
    return objective(**gathered, logit_scale=features["logit_scale"], entity_labels=labels,
                     selection_logits=features.get("selection_logits"))


class CLIPFineTuning(TrainingMethod):
    """The CLIP-FT baseline: the CLIP fine-tuned with the global contrastive loss alone."""

    name = "clip-ft"
    default_stages = (Stage("finetune", lr=5e-5, epochs=20.0, trains="all"),)

    def __init__(self, model: CLIP, cfg: TrainConfig, entities: Tuple[str, ...] = (), arch=None):
        if isinstance(model, E2Model):
            raise ValueError(f"method={self.name} fine-tunes a CLIP, but the start is an E2 model; "
                             "start from a CLIP (MODEL:TAG, a CLIP checkpoint) or use method=e2")
        super().__init__(model, cfg, entities, arch)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        # the padding-trimmed text path, as E2 gets, so both train at the same speed
        return {"image_features": self.model.encode_image(batch.images, normalize=True),
                "text_features": text_tower(self.model, batch.text, normalize=True),
                "logit_scale": self.model.logit_scale.exp()}

    def loss(self, features, ctx, sizes) -> Dict[str, torch.Tensor]:
        image = distributed.gather(features["image_features"], ctx, sizes)
        text = distributed.gather(features["text_features"], ctx, sizes)
        return {"loss": contrastive_loss(image, text, features["logit_scale"])}


class EntityFineTuning(CLIPFineTuning):
    """CLIP fine-tuning with E2's entity supervision and none of its parts: the same entity texts and
    regional losses (``global_weight``, ``entity_weights``) applied to the CLIP's own image embedding, as if
    every entity's region were the whole image. The control that tells what E2's selection tokens and fusion
    blocks add beyond the extra supervision."""

    name = "clip-ft-entities"

    def __init__(self, model: CLIP, cfg: TrainConfig, entities: Tuple[str, ...] = (), arch=None):
        super().__init__(model, cfg, entities, arch)
        if not entities:
            raise ValueError(f"method={self.name} needs a dataset with tag entities (brand, season, ...)")
        self.entities = tuple(entities)
        self.objective = RegionalContrastiveLoss(self.entities, cfg.global_weight, cfg.entity_weights,
                                                multi_positive=cfg.multi_positive)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        image = self.model.encode_image(batch.images, normalize=True)
        text, entity_text = encode_texts(self.model, batch.text, batch.entity_text, self.entities, normalize=True)
        return {"image_features": image, "text_features": text, "entity_text_features": entity_text,
                "image_regional_features": image[:, None].expand(-1, len(self.entities), -1),
                "logit_scale": self.model.logit_scale.exp(), "entity_labels": batch.entity_text.index}

    def loss(self, features, ctx, sizes) -> Dict[str, torch.Tensor]:
        return regional_objective(self.objective, features, ctx, sizes)


#: every installed training method, by the name ``--method`` takes (loaded when used)
METHODS = Registry(TRAINING_METHOD_GROUP)
