"""TrainConfig: every setting of a training run, as plain values (the CLI builds it from flags),
and :class:`Stage`, one stage of a run (stages are a list)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

from e2_core.registry import TRAINING_METHOD_GROUP, Registry

from e2_core.errors import check_at_least

_STAGE_KEYS = {"lr": float, "epochs": float, "steps": int, "trains": str, "new_lr": float}


@dataclass(frozen=True)
class Stage:
    """One stage of training: its length (epochs or steps), peak learning rate and what trains.

    ``trains="new"`` trains only what the method adds to the CLIP it starts from (E2's selection
    tokens, fusion blocks and heads); ``"all"`` trains everything. ``new_lr``, when set, is the peak
    learning rate of those added parts (``lr`` then applies to the rest).

    Example:
        >>> Stage.parse("stage1:steps=90,lr=1e-3")
        Stage(name='stage1', lr=0.001, epochs=None, steps=90, trains=None, new_lr=None)
        >>> str(Stage.parse("stage2:new_lr=5e-4"))
        'stage2:new_lr=0.0005'
    """

    name: str
    lr: Optional[float] = None
    epochs: Optional[float] = None
    steps: Optional[int] = None
    trains: Optional[Literal["new", "all"]] = None
    new_lr: Optional[float] = None

    def __post_init__(self):
        if self.trains not in (None, "new", "all"):
            raise ValueError(f"stage {self.name}: trains must be 'new' or 'all', got {self.trains!r}")

    @classmethod
    def parse(cls, text: str) -> "Stage":
        """``NAME[:key=value,...]`` with keys ``lr``, ``epochs``, ``steps``, ``trains``, ``new_lr``."""
        name, _, rest = text.partition(":")
        fields = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in _STAGE_KEYS:
                raise ValueError(f"stages={text!r}: expected NAME:key=value,... with keys {', '.join(_STAGE_KEYS)}")
            try:
                fields[key] = _STAGE_KEYS[key](value)
            except ValueError:
                raise ValueError(f"stages={text!r}: {key}={value!r} is not a {_STAGE_KEYS[key].__name__}") from None
        return cls(name, **fields)

    def over(self, default: "Stage") -> "Stage":
        """This stage with its unset fields taken from ``default``."""
        return Stage(self.name, *(getattr(self, f) if getattr(self, f) is not None else getattr(default, f)
                                  for f in _STAGE_KEYS))

    def length(self) -> float:
        return self.steps if self.steps is not None else (self.epochs or 0)

    def __str__(self) -> str:
        """The ``--stages`` form, e.g. ``stage1:lr=0.001,steps=90`` (:meth:`parse` reads it back)."""
        values = ",".join(f"{k}={getattr(self, k)}" for k in _STAGE_KEYS if getattr(self, k) is not None)
        return f"{self.name}:{values}" if values else self.name


def parse_weights(text: str) -> Dict[str, float]:
    """``NAME=W,...`` -> ``{NAME: W}`` (``--entity-weights``).

    Example:
        >>> parse_weights("season=2,brand=0.5")
        {'season': 2.0, 'brand': 0.5}
    """
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = (part.strip() for part in item.partition("="))
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = -1.0
        if not name or weights[name] < 0:
            raise ValueError(f"entity_weights={text!r}: expected NAME=W,... with W a number >= 0, "
                             "e.g. season=2,brand=2")
    return weights


def resolve_stages(given: Optional[Sequence[Stage]], defaults: Sequence[Stage]) -> List[Stage]:
    """The stages to run: ``given`` (each filled in from the default stage of the same name), or the defaults;
    as they run: an unset ``new_lr`` is ``lr``, and ``steps``, when set, replace ``epochs``."""
    by_name = {s.name: s for s in defaults}
    stages = [s.over(by_name.get(s.name, Stage(s.name, lr=5e-5, epochs=1.0, trains="all"))) for s in given] \
        if given else list(defaults)
    return [dataclasses.replace(s, new_lr=s.lr if s.new_lr is None else s.new_lr,
                                epochs=s.epochs if s.steps is None else None) for s in stages]


@dataclass
class TrainConfig:
    """A training run: E2's two stages (new parts only, then everything) or the CLIP-FT baseline.

    Args:
        out: run folder (checkpoints, metrics.jsonl, best model); a run already there is resumed
        method: an installed training method: e2, or clip-ft for the CLIP fine-tuning baseline trained by the same loop
        model: open_clip architecture of a random start (when --pretrained is not given)
        pretrained: where to start: an encoder source (MODEL:TAG, MODEL:FILE, checkpoint directory, demo:NAME) or an open_clip tag of --model
        dataset: an installed dataset reader (e2-plugins list)
        data_root: the dataset's folder or file
        stages: stages as NAME:key=value,... (keys lr, epochs, steps, trains=new|all, new_lr: the added parts' lr); a name of the method's defaults (e2: stage1, stage2; clip-ft: finetune) fills in the rest from it
        max_steps: cap on optimizer steps per stage (quick runs)
        batch_size: items per micro-batch per process
        accumulate: micro-batches per optimizer step
        warmup_steps: linear warm-up before the cosine decay
        weight_decay: Adam weight decay (never on norms, biases, logit scale, embeddings, selection tokens)
        precision: amp (bf16 where supported, else fp16 with loss scaling) or fp32
        device: auto, cpu, cuda, cuda:1, mps (torchrun sets one GPU per process)
        seed: seed of the data order, views, Gumbel noise and E2's new parts
        workers: DataLoader worker processes
        checkpoint_every: optimizer steps between checkpoints (also at every epoch end)
        eval_every: optimizer steps between validation runs (0: at every epoch end)
        multi_positive: items sharing an entity value are positives of each other
        global_weight: weight of the global loss against the mean regional loss (the paper's: 0.5; 0.8 measured better, see the README)
        entity_weights: weights of the regional losses in their mean, as NAME=W,... (unnamed entities weigh 1; e.g. season=0 for an entity the images cannot show)
        token_attention: for an E2 built on a CLIP: one-way (CLS and patches do not read the selection tokens before fusion block 2, so E2 starts as its CLIP), full (the paper's), picks-only (one-way, and the tokens read no patch but the ones they pick) or isolated (picks-only, and the tokens read no CLS either: nothing of the image but their picks)
        tokens_per_entity: for an E2 built on a CLIP: selection tokens per tag entity (the paper's: 2)
        fusion_layers: for an E2 built on a CLIP: the ViT layers run before fusion block 1 and before block 2 (not set: the paper's 8 and 11 of 12, scaled to the depth)
        gumbel_tau: for an E2 built on a CLIP: Gumbel-softmax temperature of the selection's gradient at the start of each stage
        gumbel_tau_end: for an E2 built on a CLIP: that temperature at the end of each stage (cosine schedule)
        gumbel_noise_end: for an E2 built on a CLIP: scale of the Gumbel noise in the training's patch picks at the end of each stage, from 1 at its start (0: ends on evaluation's argmax; 1: the paper's sampling throughout)
        pick_carry: for an E2 built on a CLIP: fusion block 2 picks from its own selection logits plus this times block 1's (0: independent picks, the paper's)
        centre_positions: for an E2 built on a CLIP: the selection logits read each patch less its position's mean over the images, so no patch is picked for where it is (off: the paper's)
        patch_sharing_weight: E2: weight of a penalty on different entities' selection tokens picking the same patch (0: none, the paper's)
        fade_patches: E2: in stage 1 the layers after fusion block 2 still see the image patches, faded out over the stage (attention bias log g, g from 1 to 0 on a cosine), so the last layer reads them early on
        lora_rank: LoRA rank for the stages that train everything (0: full fine-tuning)
        strict: stop at the first unreadable image instead of skipping and reporting it
        encoding: text encoding of the dataset's CSV / JSON files (e.g. latin-1, cp1252)
        progress: show a progress bar
    """

    out: str = "runs/e2"
    method: str = "e2"
    model: str = "ViT-B-32"
    pretrained: Optional[str] = None
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    stages: Optional[List[Stage]] = None
    max_steps: Optional[int] = None
    batch_size: int = 64
    accumulate: int = 1
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    precision: Literal["amp", "amp_bf16", "amp_fp16", "fp32"] = "amp"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 200
    eval_every: int = 0
    multi_positive: bool = False
    global_weight: float = 0.8
    entity_weights: Optional[Union[str, Dict[str, float]]] = None
    token_attention: Literal["one-way", "full", "picks-only", "isolated"] = "one-way"
    tokens_per_entity: int = 2
    fusion_layers: Optional[List[int]] = None
    gumbel_tau: float = 2.0
    gumbel_tau_end: float = 0.5
    gumbel_noise_end: float = 0.0
    pick_carry: float = 0.0
    centre_positions: bool = False
    patch_sharing_weight: float = 0.0
    fade_patches: bool = False
    lora_rank: int = 0
    strict: bool = False
    encoding: str = "utf-8"
    progress: bool = True

    def __post_init__(self):
        methods = Registry(TRAINING_METHOD_GROUP)
        if self.method not in methods:
            raise ValueError(f"unknown method={self.method}; the installed training methods are {', '.join(methods)}")
        if self.stages is not None:
            self.stages = [s if isinstance(s, Stage) else Stage.parse(s) if isinstance(s, str) else Stage(**s)
                           for s in self.stages]
            names = [s.name for s in self.stages]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:  # each stage keeps its run in OUT/NAME: a repeated name would find the first one's done
                raise ValueError(f"stages: each stage needs a name of its own (its run folder), but {repeated} "
                                 f"repeat in {names}; e.g. stage1:steps=90 stage2:steps=300")
        if isinstance(self.entity_weights, str):
            self.entity_weights = parse_weights(self.entity_weights)
        check_at_least(1, batch_size=self.batch_size, accumulate=self.accumulate, checkpoint_every=self.checkpoint_every,
                       tokens_per_entity=self.tokens_per_entity, max_steps=self.max_steps)
        check_at_least(0, warmup_steps=self.warmup_steps, eval_every=self.eval_every, workers=self.workers,
                       weight_decay=self.weight_decay, lora_rank=self.lora_rank, gumbel_noise_end=self.gumbel_noise_end,
                       patch_sharing_weight=self.patch_sharing_weight, pick_carry=self.pick_carry)
        if self.gumbel_tau <= 0 or self.gumbel_tau_end <= 0:
            raise ValueError(f"gumbel_tau and gumbel_tau_end must be > 0, got {self.gumbel_tau}, {self.gumbel_tau_end}")
        if self.fusion_layers is not None:
            self.fusion_layers = [int(n) for n in self.fusion_layers]
            if len(self.fusion_layers) != 2:
                raise ValueError(f"fusion_layers takes two layer counts (before block 1, before block 2), got "
                                 f"{self.fusion_layers}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """A saved run's settings (keys this version does not know are ignored; missing ones take what runs saved
        before the setting existed trained with, see :attr:`SAVED_BEFORE`, else their default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**cls.SAVED_BEFORE, **{k: v for k, v in json.loads(text).items() if k in known}})

    # settings whose default changed after runs were saved without them: what those runs trained with
    SAVED_BEFORE = {"gumbel_noise_end": 1.0}

    # settings that must match for a run folder to be resumed: what trains, on what data, and how (with the
    # method's own settings, TrainingMethod.own_settings)
    RESUME_KEYS = ("method", "model", "dataset", "batch_size", "accumulate", "seed", "lora_rank", "stages",
                   "warmup_steps", "weight_decay", "multi_positive", "global_weight", "entity_weights")

    def differences(self, other: "TrainConfig", default_stages: Sequence[Stage],
                    own_settings: Sequence[str] = ()) -> Dict[str, Tuple[str, str]]:
        """``{setting: (other's value, this one's)}`` for each of :attr:`RESUME_KEYS` and ``own_settings``
        where the two train differently (stages as they run, see :func:`resolve_stages`)."""
        keys = list(self.RESUME_KEYS) + [k for k in own_settings if k not in self.RESUME_KEYS]

        def settings(cfg):
            values = {k: getattr(cfg, k) for k in keys}
            values["stages"] = " ".join(str(s) for s in resolve_stages(cfg.stages, default_stages))
            values["entity_weights"] = values["entity_weights"] or {}
            return values
        theirs, mine = settings(other), settings(self)
        return {k: (str(theirs[k]), str(mine[k])) for k in keys if theirs[k] != mine[k]}
