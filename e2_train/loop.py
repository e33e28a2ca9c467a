"""The training loop: E2's two stages or the CLIP-FT baseline, with AMP, gradient accumulation,
checkpoints, exact resume, best-model selection and multi-process (torchrun) training.

Exact resume: the data order depends only on ``(seed, epoch)``, the view drawn for a product on
``(seed, epoch, index)``, and the Gumbel noise on the torch RNG, whose state is checkpointed.
"""
from __future__ import annotations

import json
import logging
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

from e2_core import Encoder, architecture, load_encoder, save_pretrained
from e2_core.checkpoint import WEIGHTS_NAME, load_state_dict_checked
from e2_core.errors import CheckpointError
from e2_core.reference import unpickling_reason
from e2_core.data import E2Collate, ProductDataset, open_dataset
from e2_core.runtime import autocast, grad_scaler

from . import distributed
from .config import Stage, TrainConfig, resolve_stages
from .methods import METHODS, TrainingMethod

log = logging.getLogger(__name__)

#: ``evaluate(encoder, dataset) -> {"sumr": ..., ...}``, run on the main process for model selection.
Evaluator = Callable[[Encoder, ProductDataset], Dict[str, float]]
#: ``callback(stage, step, model, logs)`` after every optimizer step.
Callback = Callable[[str, int, nn.Module, Dict[str, float]], None]


def train(cfg: TrainConfig, evaluate: Optional[Evaluator] = None, callbacks: List[Callback] = ()) -> Dict:
    """Open ``cfg.dataset`` (train and validation splits) and :func:`fit` on it.

    Example:
        >>> train(TrainConfig(out="runs/demo", model="ViT-S-16-128", dataset="synthetic"))  # doctest: +SKIP
    """
    options = dict(seed=cfg.seed, strict=cfg.strict, encoding=cfg.encoding)
    train_set = open_dataset(cfg.dataset, cfg.data_root, "train", train=True, prepare=True, **options)
    val_set = open_dataset(cfg.dataset, cfg.data_root, "validation", train=False, **options)
    return fit(cfg, train_set, val_set, evaluate, callbacks)


def fit(cfg: TrainConfig, train_set: ProductDataset, val_set: Optional[ProductDataset] = None,
        evaluate: Optional[Evaluator] = None, callbacks: List[Callback] = ()) -> Dict:
    """Run (or resume) training ``cfg.method`` on ``train_set``; returns the best model's path per stage.

    Datasets without a transform get the start encoder's evaluation preprocessing (no random
    augmentation, as in the reference recipe). ``evaluate`` scores ``val_set`` to keep the best
    model of each stage; without it the last model is kept.
    """
    ctx = distributed.setup(cfg.device)
    out = Path(cfg.out)
    method_class = METHODS[cfg.method]
    stages = [s for s in resolve_stages(cfg.stages, method_class.default_stages) if s.length() > 0]
    if stages and all((out / s.name / "done.json").is_file() for s in stages):  # finished before: nothing to build
        _claim_run_folder(out, cfg, ctx, method_class)  # still refuses other settings
        return {s.name: str(out / s.name / "best") for s in stages}
    torch.manual_seed(cfg.seed)  # E2's new parts; resumed runs restore the RNG from the checkpoint
    random.seed(cfg.seed)
    resuming = any((out / s.name / "latest.json").is_file() for s in stages)
    start = _start_encoder(cfg, resuming)
    for dataset in (train_set, val_set):
        if dataset is not None and dataset.transform is None:
            dataset.transform = start.preprocess
    method = method_class.start(start, cfg, train_set.spec.entities)
    _claim_run_folder(out, cfg, ctx, method_class)  # only once the data and the start are known to be usable
    results = {}
    for stage in stages:
        results[stage.name] = str(_run_stage(stage, method, cfg, ctx, train_set, val_set, evaluate, callbacks))
        # the next stage starts from this stage's best
        method = method_class.start(load_encoder(results[stage.name]), cfg, train_set.spec.entities)
    return results


def _start_encoder(cfg: TrainConfig, resuming: bool = False) -> Encoder:
    """The run's starting point: an encoder source, an open_clip tag of ``cfg.model``, or random weights."""
    source = cfg.pretrained
    if source is None:
        if not resuming:  # a resumed run loads its checkpoint's weights next
            log.warning("no pretrained weights given: %s starts from random weights", cfg.model)
        return Encoder(architecture.random_clip(cfg.model), arch=cfg.model)
    if not os.path.exists(source) and ":" not in source:
        source = f"{cfg.model}:{source}"
    return load_encoder(source)


def _claim_run_folder(out: Path, cfg: TrainConfig, ctx, method_class) -> None:
    saved = out / "train_config.json"
    if saved.is_file():
        text = saved.read_text()
        try:
            previous = TrainConfig.from_json(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{saved} is not a readable run configuration ({e}); use another output folder, or remove "
                             f"{out} to start the run afresh") from None
        changed = cfg.differences(previous, method_class.default_stages, method_class.own_settings)
        processes = json.loads(text).get("processes")   # unrecorded before: not checked
        if processes is not None and processes != ctx.world_size:    # another global batch and data order
            changed["processes"] = (str(processes), str(ctx.world_size))
        if changed:
            settings = "; ".join(f"{key}={saved_value}, not {key}={value}"
                                 for key, (saved_value, value) in changed.items())
            raise ValueError(f"{out} holds a run with other settings ({settings}); "
                             "use another output folder, or the same settings to resume it")
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({**json.loads(cfg.to_json()), "processes": ctx.world_size}, indent=2))
    distributed.barrier(ctx)


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


def _run_stage(stage: Stage, method: TrainingMethod, cfg: TrainConfig, ctx, train_set: ProductDataset,
               val_set: Optional[ProductDataset], evaluate, callbacks) -> Path:
    folder = Path(cfg.out) / stage.name
    if (folder / "done.json").is_file():
        return folder / "best"
    method.to(ctx.device)
    model = method.model
    method.set_stage(stage)
    if cfg.lora_rank and stage.trains != "new":  # LoRA sets what trains
        from .lora import add_lora
        add_lora(model, cfg.lora_rank)
    micro_per_epoch = len(train_set) // (cfg.batch_size * ctx.world_size)
    steps_per_epoch = micro_per_epoch // cfg.accumulate
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_set)} training products are too few for batch {cfg.batch_size} x "
                         f"{ctx.world_size} processes x {cfg.accumulate} accumulation steps")
    total = stage.steps if stage.steps is not None else math.ceil(stage.epochs * steps_per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    new_lr = None if stage.new_lr == stage.lr else stage.new_lr  # own groups only when it differs
    optimizer = torch.optim.Adam(method.parameter_groups(cfg.weight_decay, new_lr), lr=stage.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(min(cfg.warmup_steps, total), total))
    scaler = grad_scaler(ctx.device, cfg.precision)
    state = _load_latest(folder, model, optimizer, scheduler, scaler, ctx)
    step, best = state.get("step", 0), state.get("best", -math.inf)
    if ctx.is_main:
        _discard_after(folder, step, state.get("skipped_count", 0))
    net = method
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(method, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    collate = E2Collate(method.encoder().tokenizer, train_set.spec)
    log = _Log(folder, ctx, total, cfg.progress, initial=step)
    log.skipped_count = state.get("skipped_count", 0)

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
            # every process learns every process's batch size, so all skip together or none does
            sizes, skipped = distributed.batch_sizes(len(batch.indices), batch.skipped, ctx)
            log.skipped(skipped)
            if min(sizes) == 0:
                continue
            logs.update(method.on_step(step, total))
            batch = batch.to(ctx.device)
            with autocast(ctx.device, cfg.precision):
                losses = method.loss(net(batch), ctx, sizes)
            scaler.scale(losses["loss"] / cfg.accumulate).backward()
            for key, value in losses.items():
                logs[key] = logs.get(key, 0.0) + value.item() / cfg.accumulate
            micro += 1
            if micro % cfg.accumulate:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            rates = scheduler.get_last_lr()  # the added parts' groups come last
            logs.update(step=step, epoch=epoch, lr=rates[0], **({"new_lr": rates[-1]} if new_lr is not None else {}))
            log.step(stage.name, logs)
            for callback in callbacks:
                callback(stage.name, step, model, logs)
            logs = {}
            epoch_end = step % steps_per_epoch == 0 or step == total
            if evaluate is not None and val_set is not None and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and epoch_end)):
                best = _evaluate(method, val_set, evaluate, folder, step, best, log, ctx)
            if step % cfg.checkpoint_every == 0 or epoch_end:
                _save(folder, method, optimizer, scheduler, scaler, step, best, ctx, log)
            if step == total or epoch_end:
                break
    if ctx.is_main:
        if log.skipped_count:
            log.bar.write(f"{stage.name}: {log.skipped_count} unreadable image(s) skipped in all, listed in "
                          f"{log.skipped_file}")
        if not (folder / "best").is_dir():  # no evaluator: the last model is the result
            _save_model(method, folder / "best")
        (folder / "done.json").write_text(json.dumps({
            "steps": step, "best": best if math.isfinite(best) else None, "skipped": log.skipped_count,
            # where it ran: on a CPU the thread count changes the floating-point sums, so a run repeated with
            # another count (OMP_NUM_THREADS) is another run
            "device": ctx.device.type, "processes": ctx.world_size, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__}))
    log.close()
    distributed.barrier(ctx)
    return folder / "best"


def _save_model(method: TrainingMethod, path: Path) -> None:
    """The model as a plain checkpoint (LoRA deltas merged into the base weights)."""
    from .lora import merged_state_dict

    save_pretrained(method.encoder(), path, state_dict=merged_state_dict(method.model))


def _evaluate(method: TrainingMethod, val_set, evaluate, folder: Path, step: int, best: float, log, ctx) -> float:
    if ctx.is_main:
        method.model.eval()
        with torch.no_grad():
            metrics = evaluate(method.encoder(), val_set)
        method.model.train()
        log.write({"eval_step": step, **metrics})
        if metrics["sumr"] > best:
            best = metrics["sumr"]
            _save_model(method, folder / "best")
    distributed.barrier(ctx)
    return best


def _save(folder: Path, method: TrainingMethod, optimizer, scheduler, scaler, step: int, best: float, ctx,
          log) -> None:
    if not ctx.is_main:
        return
    model = method.model
    target = folder / "checkpoints" / f"step_{step:07d}"
    _save_model(method, target)
    state = {"step": step, "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "python_rng": random.getstate(), "skipped_count": log.skipped_count}
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
    try:
        state = torch.load(target / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler raises several types for foreign objects
        raise CheckpointError(f"{target / 'training_state.pt'} holds more than tensors ({unpickling_reason(err)}), "
                              f"so it is not read; it is not a file this trainer wrote: remove {target} and "
                              f"{latest} to start the stage afresh") from None
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
        log.info("resuming %s from step %s (%s)", folder.name, state["step"], target)
    return state


def _discard_after(folder: Path, step: int, skipped_count: int) -> None:
    """Undo what an interrupted run wrote after the checkpoint it resumes from (``step``; 0 for a fresh
    start): half-written ``*.tmp`` files, newer checkpoint folders, ``metrics.jsonl`` records of later
    steps and unreadable images listed since."""
    if not folder.is_dir():
        return
    for tmp in folder.rglob("*.tmp"):
        tmp.unlink()
    for newer in (folder / "checkpoints").glob("step_*"):
        if newer.name[5:].isdigit() and int(newer.name[5:]) > step:
            shutil.rmtree(newer, ignore_errors=True)
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                                   if _record_step(line) <= step))
    skipped = folder / "skipped_images.txt"
    if skipped.is_file():
        skipped.write_text("".join(skipped.read_text().splitlines(keepends=True)[:skipped_count]))


def _record_step(line: str) -> float:
    """The step a ``metrics.jsonl`` line was written at; infinite for a line cut off mid-write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    return record.get("step", record.get("eval_step", 0))


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
            self.bar = tqdm(total=total, initial=initial, desc=f"{folder.parent.name} {folder.name}",
                            disable=not progress, dynamic_ncols=True)
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

    def skipped(self, errors: List[str], shown: int = 3) -> None:
        """Count and list unreadable images; the first ``shown`` are also printed."""
        if errors:
            before, self.skipped_count = self.skipped_count, self.skipped_count + len(errors)
            if self.main:
                with open(self.skipped_file, "a") as f:
                    f.write("".join(" ".join(e.splitlines()) + "\n" for e in errors))  # one line each
                if before < shown:
                    self.bar.write(f"skipped unreadable image(s): {'; '.join(errors[:shown - before])} "
                                   f"(all listed in {self.skipped_file})")

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.metrics.close()

