"""Correctness of the E2 encoder on a GPU at real ViT-B/32 sizes (a script, not a unit test).

Checks: CUDA fp32 matches CPU fp32; AMP (bf16 and fp16) forward is finite and close to fp32;
a training step under AMP gives finite gradients on every E2 part; eval is deterministic; the
compiled encoder (the embed task's default on a GPU) selects the same patches as the eager one;
exact top-k search on CUDA returns the CPU's indices (ties included).

    python benchmarks/gpu_check.py
"""
from __future__ import annotations

import copy
import json
import sys

import torch

import e2_core
from e2_core.runtime import autocast, compiled


def trainer_check() -> dict:
    """A few steps of the real trainer under bf16 autocast and under fp16 with loss scaling."""
    import tempfile
    from pathlib import Path

    from e2_data.synthetic import write_fashiongen
    from e2_train import TrainConfig, train

    root = Path(tempfile.mkdtemp())
    write_fashiongen(root / "data", {"train": 64, "validation": 16})
    results = {}
    for precision in ("amp_bf16", "amp_fp16"):
        cfg = TrainConfig(out=str(root / precision), model="ViT-B-32", dataset="synthetic", data_root=str(root / "data"),
                          batch_size=32, stages=["stage1:steps=2", "stage2:steps=2"], precision=precision, device="cuda",
                          workers=2, progress=False)
        train(cfg)
        losses = [json.loads(line)["loss"] for stage in ("stage1", "stage2")
                  for line in open(root / precision / stage / "metrics.jsonl")]
        results[precision] = {"losses": losses, "finite": all(map(lambda v: v == v and abs(v) < 1e4, losses))}
    return results


def search_check() -> dict:
    """``topk_indices`` on CUDA returns the CPU's indices, on clustered and on heavily tied features."""
    from e2_eval import topk_indices

    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(50, 512, generator=g), dim=1)
    gallery = torch.nn.functional.normalize(centers[torch.randint(50, (20_000,), generator=g)]
                                            + 0.03 * torch.randn(20_000, 512, generator=g), dim=1)
    queries = gallery[:300] + 0.01 * torch.randn(300, 512, generator=g)
    tied = torch.randint(-1, 2, (20_000, 16), generator=g).float()        # scores take few values: ties everywhere
    results = {}
    for name, (q, x) in {"clustered": (queries, gallery), "tied": (tied[:300], tied)}.items():
        cpu = topk_indices(q, x, 10)
        # the same scores on both devices: exact small integers when tied; clustered ones may round apart
        cuda = topk_indices(q.cuda(), x.cuda(), 10).cpu()
        results[f"{name}: cuda equals cpu"] = bool(torch.equal(cpu, cuda)) if name == "tied" else \
            bool((cpu == cuda).float().mean() > 0.999)
    return results


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    torch.manual_seed(0)
    cpu_model = e2_core.create_e2("ViT-B-32").eval()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    tokenizer = e2_core.get_tokenizer("ViT-B-32")
    images = torch.randn(16, 3, 224, 224)
    tags = [dict(subcategory="SHIRTS", brand=f"Brand {i % 5}", description=f"Shirt {i} with a logo.",
                 season="FW2016", composition="100% cotton") for i in range(16)]
    texts = [e2_core.build_texts(t) for t in tags]
    text = tokenizer([g for g, _ in texts])
    entity_text = e2_core.tokenize_entities(tokenizer, [e for _, e in texts])
    report, ok = {}, True

    with torch.no_grad():
        ref = cpu_model.encode_image_regions(images)
        gpu = gpu_model.encode_image_regions(images.cuda())
        report["fp32 cuda vs cpu: max abs diff (global)"] = (gpu.image_features.cpu() - ref.image_features).abs().max().item()
        report["fp32 cuda vs cpu: selected patches equal"] = bool(torch.equal(gpu.selected_patches.cpu(), ref.selected_patches))
        ok &= report["fp32 cuda vs cpu: max abs diff (global)"] < 1e-3
        for precision in ("amp_bf16", "amp_fp16"):
            with autocast(torch.device("cuda"), precision):
                amp = gpu_model.encode_image_regions(images.cuda(), normalize=True)
            ref_n = torch.nn.functional.normalize(ref.image_features, dim=-1)
            cos = (amp.image_features.float().cpu() * ref_n).sum(-1).min().item()
            report[f"{precision}: finite"] = bool(torch.isfinite(amp.image_features).all())
            report[f"{precision}: min cosine to fp32"] = cos
            ok &= report[f"{precision}: finite"] and cos > 0.99
        again = gpu_model.encode_image_regions(images.cuda())
        report["eval deterministic on cuda"] = bool(torch.equal(again.image_features, gpu.image_features))
        ok &= report["eval deterministic on cuda"]
        fast = compiled(gpu_model.encode_image_regions, torch.device("cuda"))(images.cuda())  # embed's default
        report["compiled vs eager fp32: selected patches equal"] = bool(torch.equal(fast.selected_patches,
                                                                                   gpu.selected_patches))
        report["compiled vs eager fp32: max abs diff (global)"] = \
            (fast.image_features - gpu.image_features).abs().max().item()
        ok &= report["compiled vs eager fp32: selected patches equal"]

    gpu_model.train()
    loss_fn = e2_core.RegionalContrastiveLoss(gpu_model.entities)
    with autocast(torch.device("cuda"), "amp"):
        losses = loss_fn(**gpu_model(images.cuda(), text.cuda(), entity_text.to('cuda')))
    losses["loss"].backward()
    visual = gpu_model.visual
    grads = {"selection_tokens": visual.selection_tokens.tokens.grad,
             **{f"fusion{i}.{p}": getattr(visual.fusion[i], p).weight.grad for i in range(2) for p in "qkv"},
             "regional_heads.proj": visual.regional_heads.proj.grad, "proj_cls": visual.proj_cls.grad}
    report["amp train loss"] = losses["loss"].item()
    report["amp grads finite and nonzero"] = {k: bool(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0)
                                              for k, g in grads.items()}
    ok &= all(report["amp grads finite and nonzero"].values()) and bool(torch.isfinite(losses["loss"]))
    report["search"] = search_check()
    ok &= all(report["search"].values())
    report["trainer"] = trainer_check()
    ok &= all(v["finite"] for v in report["trainer"].values())
    report["device"] = torch.cuda.get_device_name()
    report["torch"] = torch.__version__
    print(json.dumps(report, indent=2))
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
