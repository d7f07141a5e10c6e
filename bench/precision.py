"""bfloat16 vs float32 for the SAM 2 and SAM 3 image encoders on this CPU, with mask agreement.

    python bench/precision.py [--rounds 2] [--families sam2,sam3]

In-process (no server): the full-size models of configs/bench-full.yaml (random, seeded
weights), the photos scikit-image ships. Each photo is encoded in both precisions in turns;
then the same prompts run on both encodings and the masks are compared (IoU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, ran, spread, table, timed  # noqa: E402

# isort: split
import torch  # noqa: E402

from apis.clip.model import dense_features as clip_dense  # noqa: E402
from apis.clip.model import load_clip  # noqa: E402
from apis.config import load_config  # noqa: E402
from apis.core.dense import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, to_tensor  # noqa: E402
from apis.dino.model import dense_features as dino_dense  # noqa: E402
from apis.dino.model import load_dino  # noqa: E402
from apis.sam2.model import Prompt, load_sam2, predict_prompt  # noqa: E402
from apis.sam3.model import Query, instance_mask, load_sam3  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea")


def photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: getattr(skimage.data, name)()[..., :3] for name in PHOTOS}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def sam2_case(cfg, rounds: int):
    pred = load_sam2(cfg.sam2.models[0], "cpu", torch.float32, cache_size=0)
    times = {torch.float32: [], torch.bfloat16: []}
    ious = []
    for name, im in photos().items():
        h, w = im.shape[:2]
        prompts = [
            Prompt(point_coords=[[w * fx, h * fy]], point_labels=[1])
            for fx, fy in ((0.3, 0.4), (0.6, 0.5), (0.5, 0.8))
        ]
        masks = {}
        for r in range(rounds):
            order = [torch.float32, torch.bfloat16] if r % 2 == 0 else [torch.bfloat16, torch.float32]
            for dtype in order:
                pred.dtype = dtype
                times[dtype].append(timed(lambda im=im, name=name: pred.embeddings([name], [im])))
        for dtype in (torch.float32, torch.bfloat16):
            pred.dtype = dtype
            emb = pred.embeddings([name], [im])[0]
            masks[dtype] = [predict_prompt(pred, emb, pr)[0] > 0.5 for pr in prompts]
        for a, b in zip(masks[torch.float32], masks[torch.bfloat16], strict=True):
            ious += [iou(x, y) for x, y in zip(a, b, strict=True)]
        print("sam2", name, ms(times[torch.float32][-1]), ms(times[torch.bfloat16][-1]), flush=True)
    return times, ious


def sam3_case(cfg, rounds: int, top: int = 10):
    runner = load_sam3(cfg.sam3.models[0], "cpu", torch.float32, cache_size=0)
    times = {torch.float32: [], torch.bfloat16: []}
    ious = []
    for name, im in photos().items():
        h, w = im.shape[:2]
        for r in range(rounds):
            order = [torch.float32, torch.bfloat16] if r % 2 == 0 else [torch.bfloat16, torch.float32]
            for dtype in order:
                runner.dtype = dtype
                times[dtype].append(timed(lambda im=im, name=name: runner.encode([name], [im])))
        masks = {}
        for dtype in (torch.float32, torch.bfloat16):
            runner.dtype = dtype
            det = runner.detect([Query(runner.encode([name], [im])[0], "cat")], chunk=1)[0]
            if dtype == torch.float32:
                queries = torch.argsort(det.scores, descending=True)[:top].tolist()
            masks[dtype] = [instance_mask(det.mask_logits[q], h, w) for q in queries]
        ious += [iou(a, b) for a, b in zip(masks[torch.float32], masks[torch.bfloat16], strict=True)]
        print("sam3", name, ms(times[torch.float32][-1]), ms(times[torch.bfloat16][-1]), flush=True)
    return times, ious


def features_case(cfg, family: str, rounds: int, side: int = 448):
    """CLIP / DINOv2 dense features of each photo (resized to ``side`` px) in both precisions;
    agreement = median cosine similarity of the per-patch features."""
    from PIL import Image

    if family == "clip":
        model = load_clip(cfg.clip.models[0], "cpu", torch.float32)
        forward, mean, std = (lambda x: clip_dense(model, x)), CLIP_MEAN, CLIP_STD
    else:
        model = load_dino(cfg.dino.models[0], "cpu", torch.float32)
        forward, mean, std = (lambda x: dino_dense(model, x, 14, "token", -1)), IMAGENET_MEAN, IMAGENET_STD
    times = {torch.float32: [], torch.bfloat16: []}
    cosines = []
    for name, im in photos().items():
        x = to_tensor(Image.fromarray(im).resize((side, side), Image.BICUBIC), mean, std)
        out = {}
        for r in range(rounds):
            for dtype in [torch.float32, torch.bfloat16][:: 1 if r % 2 == 0 else -1]:
                model.dtype = dtype
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    out[dtype] = forward(x).float()
                    times[dtype].append(time.perf_counter() - t0)
        a, b = out[torch.float32].flatten(0, -2), out[torch.bfloat16].flatten(0, -2)
        cosines += torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
        print(family, name, ms(times[torch.float32][-1]), ms(times[torch.bfloat16][-1]), flush=True)
    return times, cosines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--families", default="sam2,sam3,clip,dino")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "bench-full.yaml")
    torch.manual_seed(0)
    rows = []
    for family in args.families.split(","):
        if family in ("clip", "dino"):
            times, ious = features_case(cfg, family, args.rounds)
        else:
            times, ious = (sam2_case if family == "sam2" else sam3_case)(cfg, args.rounds)
        f32, bf16 = statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])
        rows.append(
            [
                family,
                ms(f32),
                spread(times[torch.float32]),
                ms(bf16),
                spread(times[torch.bfloat16]),
                f"**{f32 / bf16:.2f}x**",
                f"{statistics.median(ious):.3f}",
                f"{min(ious):.3f}",
            ]
        )
    print(
        ran(
            f"photos: {', '.join(PHOTOS)} (scikit-image); random seeded weights; "
            "agreement = mask IoU (SAM) or feature cosine (CLIP, DINO)"
        )
    )
    print(
        table(
            [
                "encoder",
                "fp32 p50 ms",
                "spread",
                "bf16 p50 ms",
                "spread",
                "speed-up",
                "agreement median",
                "min",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
