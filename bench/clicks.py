"""SAM 2 clicks on an embedded image: where a click's time goes, and what HTTP adds to it.

    python bench/clicks.py [--config configs/bench-full.yaml] [--clicks 8] [--rounds 3]

One 1024x768 JPEG (bench/image_id.py's photo) is encoded once, in this process and in the
server; every click then sends its ``image_id`` and one point.

In-process, stage by stage on the worker's own predictor (medians of ``--clicks`` clicks): the
prompt encoder + mask decoder (the model), upsampling three masks or one to the image, the
threshold, the answer's encodings, and the whole route (validation, the worker's
``answer``: decode, predict, encode, JSON rendering) per answer form: the seed's (three float32
masks and float32 logits), packbits masks, and the compact one (``best_only``, ``coco_rle``, no
low-res logits). Over HTTP, per form: p50 at c = 1, alternated with the model in this process
(``harness.alternate``), and "uvicorn alone" (``bench/floor.py``) taking the same request bytes
and answering as many bytes: model + uvicorn alone is the target for a click; then c = 4.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402  (first: it sets the workers' OpenMP settings before torch loads)
    ROOT,
    Client,
    alternate,
    drive,
    encode,
    floor_server,
    ms,
    p,
    ran,
    server,
    spread,
    table,
    timed,
)
from bench.image_id import photo  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from apis.config import load_config  # noqa: E402
from apis.core.encodings import coco_rle, encode_array  # noqa: E402
from apis.families import FAMILIES  # noqa: E402
from apis.sam2 import model as sam2_model  # noqa: E402
from apis.sam2.api import encode_binary  # noqa: E402
from bench.serving import in_process  # noqa: E402

COMPACT = {"best_only": True, "mask_encoding": "coco_rle", "return_low_res_masks": False}
FORMS = {
    "seed (3 float32 masks + float32 logits)": {},
    "packbits (3 masks + float32 logits)": {"mask_encoding": "packbits"},
    "compact (best_only, coco_rle, no logits)": COMPACT,
}
FLOOR_CALLS = 30


def click(i: int) -> list[list[float]]:
    """The i-th click: one point, on a 5 x 4 grid over the image, so consecutive clicks differ."""
    return [[150.0 + 700 * (i % 5) / 4, 120.0 + 500 * (i // 5 % 4) / 3]]


class Clicker:
    """Clicks in this process on the worker's own predictor, at a new point each time."""

    def __init__(self, api, image_id: str):
        self.api, self.image_id = api, image_id
        self.pred = api.model(api.registry.entries[0])
        self.emb = self.pred.cache.get(image_id)
        self.points = map(click, itertools.count())

    def decoder(self):
        """The model alone: prompt encoder + mask decoder, as the route runs them."""
        prompt = sam2_model.Prompt(point_coords=[next(self.points)], point_labels=[1])
        dec = sam2_model.decode_prompts(self.pred, [self.emb], [prompt])[0]
        return dec.logits, dec.iou, dec.low

    @torch.inference_mode()
    def library(self):
        self.pred.use(self.emb)
        pt = np.asarray(next(self.points), np.float32)
        return self.pred.predict(point_coords=pt, point_labels=np.ones(1, np.int32))

    def route(self, form: dict) -> object:
        """The worker's whole work for a request, rendered answer included."""
        payload = {"image_id": self.image_id, "point_coords": next(self.points), "point_labels": [1], **form}
        return in_process(self.api, "prompt_mask", payload)


@torch.inference_mode()
def stages(clicker: Clicker, n: int) -> list[list[str]]:
    """Table rows of the in-process stages (medians of ``n`` clicks)."""
    pred, hw = clicker.pred, clicker.emb.orig_hw
    logits, _, low = clicker.decoder()
    post = pred._transforms.postprocess_masks
    up3 = post(logits, hw)[0]
    bool3 = (up3 > 0).numpy()
    one = logits[0, :1].float().numpy()
    low_np = low[0].float().numpy()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("prompt encoder + mask decoder (the model)", clicker.decoder),
        ("upsample 3 masks, torch (the library)", lambda: post(logits, hw)),
        ("upsample 1 mask, torch", lambda: post(logits[:, :1], hw)),
        ("upsample 1 mask, OpenCV (the route)", lambda: sam2_model.upsample(one, hw)),
        ("threshold 3 masks, torch (the library)", lambda: up3 > 0),
        ("threshold 1 mask, numpy (the route)", lambda: one > 0),
        ("encode 3 masks, float32 base64 (seed)", lambda: encode_binary(bool3, "float32")),
        ("encode 3 masks, packbits", lambda: encode_binary(bool3, "packbits")),
        ("encode 1 mask, coco_rle", lambda: coco_rle(bool3[0])),
        ("encode 3 low-res logits, float32 base64", lambda: encode_array(low_np)),
        ("SAM2ImagePredictor.predict (the library, 3 masks)", clicker.library),
        *((f"whole route in-process, {k}", lambda f=f: clicker.route(f)) for k, f in FORMS.items()),
    ]
    rows = []
    for label, fn in steps:
        fn()
        rows.append([label, ms(statistics.median(timed(fn) for _ in range(n)))])
    return rows


def over_http(url: str, clicker: Clicker, rounds: int) -> tuple[list[list[str]], list[list[str]]]:
    """c = 1 rows: each form over HTTP alternated with the model in this process, so both see
    the same machine, then uvicorn alone with its bytes; and c = 4 rows."""
    client = Client(url)
    points = map(click, itertools.count())

    def body(form: dict) -> bytes:
        return encode(
            {"image_id": clicker.image_id, "point_coords": next(points), "point_labels": [1], **form}
        )

    one = []
    with floor_server() as floor_url:
        floor = Client(floor_url)
        for label, form in FORMS.items():
            size = len(client.post("/sam2/prompt_mask", body(form)))
            http, model = alternate(
                lambda f=form: client.post("/sam2/prompt_mask", body(f)), clicker.decoder, rounds
            )
            answer, sent = f"/{size}", body(form)
            floor.post(answer, sent)
            alone = statistics.median(
                timed(lambda a=answer, b=sent: floor.post(a, b)) for _ in range(FLOOR_CALLS)
            )
            h, m = statistics.median(http), statistics.median(model)
            one.append(
                [
                    label,
                    f"{size:,}",
                    ms(h),
                    spread(http),
                    ms(m),
                    spread(model),
                    ms(alone),
                    f"{h / (m + alone):.3f}",
                ]
            )
            print(one[-1], flush=True)
        floor.close()
    client.close()
    four = []
    for label, form in FORMS.items():
        payloads = [
            {"image_id": clicker.image_id, "point_coords": pt, "point_labels": [1], **form}
            for pt in map(click, range(8 * rounds))
        ]
        run = drive(f"{url}/sam2/prompt_mask", payloads, 4)
        four.append([label, ms(p(run.latencies, 50)), ms(p(run.latencies, 95)), f"{run.throughput:.1f}"])
        print(four[-1], flush=True)
    return one, four


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--clicks", type=int, default=8, help="timed calls per in-process stage")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of 3 timed clicks per side")
    args = ap.parse_args()
    image = base64.b64encode(photo("JPEG")).decode("ascii")
    api = FAMILIES["sam2"].api_class()(load_config(args.config))
    api.setup("cpu")
    clicker = Clicker(api, in_process(api, "embed", {"image": image})["image_id"])
    rows = stages(clicker, args.clicks)
    print(ran(f"1024x768 JPEG, one point per click, medians of {args.clicks} clicks per stage"))
    print(table(["in-process stage", "ms"], rows), flush=True)
    with server(args.config, "--models", "sam2") as url:
        Client(url).post("/sam2/embed", encode({"image": image}))
        one, four = over_http(url, clicker, args.rounds)
    print(ran(f"{args.rounds} alternations of 3 timed clicks per side; uvicorn alone: {FLOOR_CALLS} calls"))
    header = ["answer", "bytes", "HTTP p50 ms, c = 1", "spread", "model p50 ms", "spread", "uvicorn alone ms"]
    print(table([*header, "HTTP / (model + alone)"], one))
    print()
    print(table(["answer", "p50 ms, c = 4", "p95 ms", "clicks/s"], four))


if __name__ == "__main__":
    main()
