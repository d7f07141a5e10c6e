"""A SAM 2 click's decoder in this process: the library's steps against the route's.

    python -m bench.decoder [--work DIR] [--threads 1,2] [--clicks 10] [--rounds 6]

On the seeded SAM 2.1 hiera_large checkpoint of ``bench/peer_roboflow.py`` (same ``--work``),
one 1024x768 photo encoded once, then clicks at new points, taken in turns, per torch thread
count:

* ``SAM2ImagePredictor.predict``: the library's whole click (three masks upsampled);
* the library's decoder alone: its prompt encoder and ``MaskDecoder`` on the cached features,
  as ``_predict`` runs them (the route's decoder before the image's share was kept);
* the route's decoder, eager and traced (``sam2.trace_decoder``): ``decode_prompts``, with the
  first layer's projections of the image tokens computed once for the image.

Medians over rounds of the per-click median of ``--clicks`` clicks; the best score of the
first click on every side, which must agree.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peer_roboflow as rf  # noqa: E402  (first: harness sets the workers' OpenMP settings)
from bench.harness import ms, ran, table  # noqa: E402
from bench.peers import CACHE, load_average  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=CACHE / "work", help="bench/peer_roboflow.py's --work")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    work = args.work / "roboflow"
    if not rf.weights(work).is_file():
        sys.exit(f"no checkpoint at {rf.weights(work)}: run `python -m bench.peer_roboflow` once first")

    import numpy as np
    import torch
    from PIL import Image
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from apis.sam2 import model as sam2_model

    before = load_average()
    net = build_sam2(rf.SAM2_CONFIG, str(rf.weights(work)), device="cpu")
    photo = np.array(Image.open(io.BytesIO(rf.images()[0])).convert("RGB"))
    library = SAM2ImagePredictor(net)
    eager = sam2_model.Sam2Predictor(net, 2, trace_decoder=False)
    traced = sam2_model.Sam2Predictor(net, 2, trace_decoder=True)
    with torch.inference_mode():
        library.set_image(photo)
    emb = eager.embeddings(["photo"], [photo])[0]
    one = np.ones(1, np.int32)

    @torch.inference_mode()
    def predict(point: list[float]) -> float:
        _, scores, _ = library.predict(point_coords=np.asarray([point], np.float32), point_labels=one)
        return float(scores.max())

    @torch.inference_mode()
    def decoder_alone(point: list[float]) -> float:
        xy = np.asarray([point], np.float32)
        mask_in, coords, labels, _ = library._prep_prompts(xy, one, None, None, True)
        sparse, dense = net.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_in)
        feats = library._features
        _, iou, _, _ = net.sam_mask_decoder(
            image_embeddings=feats["image_embed"],
            image_pe=net.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=False,
            high_res_features=feats["high_res_feats"],
        )
        return float(iou.max())

    def route(pred: sam2_model.Sam2Predictor) -> Callable[[list[float]], float]:
        def click(point: list[float]) -> float:
            prompt = sam2_model.Prompt(point_coords=[point], point_labels=[1])
            dec = sam2_model.decode_prompts(pred, [emb], [prompt])[0]
            return float(dec.iou.max())

        return click

    sides = {
        "SAM2ImagePredictor.predict (the library's whole click)": predict,
        "the library's decoder alone (prompt encoder + MaskDecoder)": decoder_alone,
        "the route's decoder, eager, the image's share kept": route(eager),
        "the route's decoder, traced, the image's share kept": route(traced),
    }
    scores = {name: fn(rf.click(0)) for name, fn in sides.items()}  # also traces the traced side
    counts = [int(n) for n in args.threads.split(",")]
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in sides for n in counts}
    point = iter(rf.click(i) for i in range(1, 10**9))
    threads = torch.get_num_threads()
    for r in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            order = list(sides.items())
            for name, fn in order if r % 2 == 0 else reversed(order):
                fn(next(point))  # untimed: the thread count's first click
                per = []
                for _ in range(args.clicks):
                    t0 = time.perf_counter()
                    fn(next(point))
                    per.append(time.perf_counter() - t0)
                times[name, n].append(statistics.median(per))
    torch.set_num_threads(threads)
    after = load_average()
    print(
        ran(
            f"SAM 2.1 hiera_large (seeded random weights), a 1024x768 photo; medians over rounds of "
            f"the median of {args.clicks} clicks, sides in turns; load average {before} before, {after} after"
        )
    )
    print()
    header = ["side", *(f"ms per click, {n} thread{'s' * (n > 1)}" for n in counts), "best score, 1st click"]
    rows = [
        [name, *(ms(statistics.median(times[name, n])) for n in counts), f"{scores[name]:.8f}"]
        for name in sides
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
