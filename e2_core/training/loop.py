"""The training loop: E2's two stages or the CLIP-FT baseline, with AMP, gradient accumulation,
checkpoints, exact resume, best-model selection and multi-process (torchrun) training.

Exact resume: the data order depends only on ``(seed, epoch)``, the view drawn for a product on
``(seed, epoch, index)``, and the Gumbel noise on the torch RNG, whose state is checkpointed.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import WEIGHTS_NAME, load_state_dict_checked, save_pretrained
from ..data import E2Collate, ProductDataset
from ..data.open import open_dataset
from ..factory import create_clip, create_e2, get_tokenizer, image_transforms, load_checkpoint
from ..fusion import TemperatureSchedule
from ..loss import RegionalContrastiveLoss, contrastive_loss
from ..model import E2Model, encode_text_any_length, is_e2_parameter
from ..runtime import autocast
from . import distributed
from .config import TrainConfig

#: ``evaluate(model, dataset) -> {"sumr": ..., ...}``, run on the main process for model selection.
Evaluator = Callable[[nn.Module, ProductDataset], Dict[str, float]]
#: ``callback(stage, step, model, logs)`` after every optimizer step.
Callback = Callable[[str, int, nn.Module, Dict[str, float]], None]


def train(cfg: TrainConfig, evaluate: Optional[Evaluator] = None, callbacks: List[Callback] = ()) -> Dict:
    """Run (or resume) the training ``cfg`` describes; returns the path of the final best model per stage.

    Example:
        >>> train(TrainConfig(out="runs/demo", model="ViT-S-16-128", dataset="synthetic"))  # doctest: +SKIP
    """
    ctx = distributed.setup(cfg.device)
    out = Path(cfg.out)
    _claim_run_folder(out, cfg, ctx)
    torch.manual_seed(cfg.seed)  # the new parts' init; resumed runs restore the RNG from the checkpoint
    random.seed(cfg.seed)
    model = (create_e2 if cfg.encoder == "e2" else create_clip)(cfg.model, cfg.pretrained)
    _, preprocess = image_transforms(model)  # no random augmentation, as in the reference recipe
    tokenizer = get_tokenizer(model)
    data = dict(train=True, transform=preprocess, seed=cfg.seed, strict=cfg.strict)
    train_set = open_dataset(cfg.dataset, cfg.data_root, "train", size=cfg.synthetic_size, **data)
    val_set = open_dataset(cfg.dataset, cfg.data_root, "validation", size=cfg.synthetic_size,
                           **{**data, "train": False})
    stages = [("stage1", cfg.stage1_epochs, cfg.stage1_steps, cfg.stage1_lr),
              ("stage2", cfg.stage2_epochs, cfg.stage2_steps, cfg.stage2_lr)] \
        if cfg.encoder == "e2" else [("finetune", cfg.stage2_epochs, cfg.stage2_steps, cfg.stage2_lr)]
    results = {}
    for name, epochs, steps, lr in stages:
        if (steps if steps is not None else epochs) <= 0:
            continue
        results[name] = str(_run_stage(name, epochs, steps, lr, model, cfg, ctx, train_set, val_set, tokenizer,
                                       evaluate, callbacks))
        model = load_checkpoint(results[name])  # the next stage starts from this stage's best
    return results


def _claim_run_folder(out: Path, cfg: TrainConfig, ctx) -> None:
    saved = out / "train_config.json"
    if saved.is_file():
        previous = json.loads(saved.read_text())
        changed = [k for k in TrainConfig.RESUME_KEYS if previous.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(f'{k}={previous.get(k)!r}' for k in changed)}); "
                             "use another --out, or the same settings to resume it")
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(cfg.to_json())
    distributed.barrier(ctx)


def _set_trainable(model: nn.Module, stage: str) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(stage != "stage1" or is_e2_parameter(name))


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _epoch_batches(n: int, cfg: TrainConfig, ctx, epoch: int) -> List[List[int]]:
    """This process's micro-batches of an epoch: a seeded permutation, sharded, the tail dropped."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    per_step = cfg.batch_size * ctx.world_size
    usable = (n // per_step) * per_step
    shard = order[:usable][ctx.rank::ctx.world_size]
    return [shard[i:i + cfg.batch_size].tolist() for i in range(0, len(shard), cfg.batch_size)]


def _run_stage(stage: str, epochs: float, steps: Optional[int], lr: float, model: nn.Module, cfg: TrainConfig, ctx,
               train_set: ProductDataset, val_set: ProductDataset, tokenizer, evaluate, callbacks) -> Path:
    folder = Path(cfg.out) / stage
    if (folder / "done.json").is_file():
        return folder / "best"
    model.to(ctx.device)
    if cfg.lora_rank and stage != "stage1":
        from .lora import add_lora
        add_lora(model, cfg.lora_rank)
    else:
        _set_trainable(model, stage)
    micro_per_epoch = len(train_set) // (cfg.batch_size * ctx.world_size)
    steps_per_epoch = micro_per_epoch // cfg.accumulate
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_set)} training products are too few for batch {cfg.batch_size} x "
                         f"{ctx.world_size} processes x {cfg.accumulate} accumulation steps")
    total = steps if steps is not None else math.ceil(epochs * steps_per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(min(cfg.warmup_steps, total), total))
    fp16 = cfg.precision == "amp_fp16" or (cfg.precision == "amp" and ctx.device.type == "cuda"
                                           and not torch.cuda.is_bf16_supported())
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=fp16 and ctx.device.type == "cuda")
    is_e2 = isinstance(model, E2Model)
    tau = TemperatureSchedule(model.config.gumbel_tau, model.config.gumbel_tau_end, total) if is_e2 else None
    loss_fn = RegionalContrastiveLoss(model.entities, cfg.global_weight, multi_positive=cfg.multi_positive) \
        if is_e2 else None
    state = _load_latest(folder, model, optimizer, scheduler, scaler, ctx)
    step, best = state.get("step", 0), state.get("best", -math.inf)
    net = model if is_e2 else _ClipForward(model)
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    collate = E2Collate(tokenizer, train_set.spec)
    log = _Log(folder, ctx, total, cfg.progress, initial=step)

    while step < total:
        epoch, position = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        batches = _epoch_batches(len(train_set), cfg, ctx, epoch)[position * cfg.accumulate:
                                                                   steps_per_epoch * cfg.accumulate]
        loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate, num_workers=cfg.workers,
                            pin_memory=ctx.device.type == "cuda",  # own generator: the global RNG stays untouched
                            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        model.train()
        micro, logs = 0, {}
        for batch in loader:
            log.skipped(batch.skipped)
            if not batch.indices:
                continue
            if tau is not None:
                model.set_gumbel_temperature(tau(step))
            batch = batch.to(ctx.device)
            with autocast(ctx.device, cfg.precision):
                losses = _losses(net, batch, loss_fn, ctx)
            scaler.scale(losses["loss"] / cfg.accumulate).backward()
            logs = {k: logs.get(k, 0.0) + v.item() / cfg.accumulate for k, v in losses.items()}
            micro += 1
            if micro % cfg.accumulate:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            logs.update(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], **({"tau": tau(step)} if tau else {}))
            log.step(stage, logs)
            for callback in callbacks:
                callback(stage, step, model, logs)
            logs = {}
            epoch_end = step % steps_per_epoch == 0 or step == total
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                         or (not cfg.eval_every and epoch_end)):
                best = _evaluate(model, val_set, evaluate, folder, step, best, log, ctx)
            if step % cfg.checkpoint_every == 0 or epoch_end:
                _save(folder, model, optimizer, scheduler, scaler, step, best, ctx)
            if step == total or epoch_end:
                break
    if ctx.is_main:
        if not (folder / "best").is_dir():  # no evaluator: the last model is the result
            save_pretrained(model, folder / "best")
        (folder / "done.json").write_text(json.dumps({"steps": step, "best": best, "skipped": log.skipped_count}))
    log.close()
    distributed.barrier(ctx)
    return folder / "best"


class _ClipForward(nn.Module):
    """CLIP's forward with the padding-trimmed text path E2 uses, so the baseline gets the same speed-up."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"image_features": self.clip.encode_image(images, normalize=True),
                "text_features": encode_text_any_length(self.clip, text, normalize=True),
                "logit_scale": self.clip.logit_scale.exp()}


def _losses(net: nn.Module, batch, loss_fn, ctx) -> Dict[str, torch.Tensor]:
    """Global (and regional) InfoNCE over the batch gathered from every process."""
    if loss_fn is None:  # CLIP-FT
        out = net(batch.images, batch.text)
        image, text = distributed.gather(out["image_features"], ctx), distributed.gather(out["text_features"], ctx)
        return {"loss": contrastive_loss(image, text, out["logit_scale"])}
    out = net(batch.images, batch.text, batch.entity_text)
    labels = batch.entity_text.index + ctx.rank * 1_000_000  # string ids are per process: no cross-process positives
    gathered = {k: distributed.gather(out[k], ctx) for k in
                ("image_features", "text_features", "image_regional_features", "entity_text_features")}
    return loss_fn(**gathered, logit_scale=out["logit_scale"], entity_labels=distributed.gather(labels, ctx))


def _evaluate(model, val_set, evaluate, folder: Path, step: int, best: float, log, ctx) -> float:
    if ctx.is_main:
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model, val_set)
        model.train()
        log.write({"eval_step": step, **metrics})
        if metrics["sumr"] > best:
            best = metrics["sumr"]
            save_pretrained(model, folder / "best")
    distributed.barrier(ctx)
    return best


def _save(folder: Path, model, optimizer, scheduler, scaler, step: int, best: float, ctx) -> None:
    if not ctx.is_main:
        return
    target = folder / "checkpoints" / f"step_{step:07d}"
    save_pretrained(model, target)
    state = {"step": step, "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "python_rng": random.getstate()}
    from .lora import has_lora
    if has_lora(model):  # the checkpoint holds merged weights; resuming needs the base weights and adapters
        state["unmerged_model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, target / "training_state.pt.tmp")
    os.replace(target / "training_state.pt.tmp", target / "training_state.pt")
    latest = folder / "latest.json"
    latest.with_suffix(".tmp").write_text(json.dumps({"step": step, "path": target.name}))
    os.replace(latest.with_suffix(".tmp"), latest)
    for old in sorted((folder / "checkpoints").glob("step_*"))[:-2]:  # keep the two newest
        shutil.rmtree(old, ignore_errors=True)


def _load_latest(folder: Path, model, optimizer, scheduler, scaler, ctx) -> Dict:
    latest = folder / "latest.json"
    if not latest.is_file():
        return {}
    target = folder / "checkpoints" / json.loads(latest.read_text())["path"]
    state = torch.load(target / "training_state.pt", map_location="cpu", weights_only=True)
    if "unmerged_model" in state:  # a LoRA run: the model already has its adapters (add_lora ran first)
        model.load_state_dict(state.pop("unmerged_model"))
    else:
        load_state_dict_checked(model, load_file(target / WEIGHTS_NAME), source=str(target))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    if ctx.is_main:
        print(f"resuming {folder.name} from step {state['step']} ({target})")
    return state


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class _Log:
    """Progress bar, ``metrics.jsonl`` and the list of unreadable images, on the main process only."""

    def __init__(self, folder: Path, ctx, total: int, progress: bool, initial: int):
        self.main = ctx.is_main
        self.skipped_count = 0
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            self.metrics = open(folder / "metrics.jsonl", "a")
            self.skipped_file = folder / "skipped_images.txt"
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=folder.name, disable=not progress, dynamic_ncols=True)
        self.start = time.time()

    def write(self, record: Dict) -> None:
        if self.main:
            self.metrics.write(json.dumps({**record, "time": round(time.time() - self.start, 2)}) + "\n")
            self.metrics.flush()

    def step(self, stage: str, logs: Dict) -> None:
        if self.main:
            self.write({"stage": stage, **logs})
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.2e}")

    def skipped(self, errors: List[str]) -> None:
        if errors:
            self.skipped_count += len(errors)
            if self.main:
                with open(self.skipped_file, "a") as f:
                    f.write("".join(e + "\n" for e in errors))
                self.bar.write(f"skipped {len(errors)} unreadable image(s), e.g. {errors[0]} "
                               f"(all listed in {self.skipped_file})")

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.metrics.close()

