"""Background removal end to end: real server subprocess, real client, alphas against onnxruntime.

Two tiny ONNX models are exported here from a small torch module with the RMBG signature: one
with a dynamic batch axis run with RMBG-2.0's processing, one with a fixed batch of 1 run with
RMBG-1.4's. References run the same files with onnxruntime in this process, with the
pre/post-processing README.md documents, written out step by step.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import requests
from PIL import Image

from apis.rmbg.model import tiny_onnx
from clients.common import VisionServeError, encode_image, post
from clients.rmbg_client import main as rmbg_cli
from clients.rmbg_client import remove_background, remove_background_response
from tests.conftest import KEYS, ServerProcess

V2 = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "sigmoid": True, "min_max": False}
V14 = {"mean": (0.5, 0.5, 0.5), "std": (1.0, 1.0, 1.0), "sigmoid": False, "min_max": True}


@pytest.fixture(scope="module")
def onnx_files(assets):
    dynamic, static = assets / "rmbg-dynamic.onnx", assets / "rmbg-static.onnx"
    tiny_onnx(dynamic, seed=1, size=64)
    tiny_onnx(static, seed=2, size=48, dynamic_batch=False)
    return dynamic, static


@pytest.fixture(scope="module")
def rmbg_server(tmp_path_factory, onnx_files):
    dynamic, static = onnx_files
    config = {
        "limits": {"max_response_bytes": 4 * 1024 * 1024},
        "rmbg": {
            "max_batch_size": 8,
            "batch_timeout": 0.2,
            "models": [
                {"name": "rmbg-tiny", "weights": str(dynamic), "preset": "rmbg-2.0", "input_size": 64},
                {"name": "RMBG-1.4-tiny", "weights": str(static)},  # preset from the name, size from the file
            ],
        },
    }
    server = ServerProcess(config, tmp_path_factory.mktemp("rmbg-server"), ["--api-key", KEYS[0]])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def kw(rmbg_server):
    return {"base_url": rmbg_server.url + "/rmbg", "api_key": KEYS[0]}


def photo(h: int = 45, w: int = 61, seed: int = 0) -> Image.Image:
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2)[..., None]
    noise = np.random.default_rng(seed).integers(0, 60, (h, w, 3))
    return Image.fromarray((np.where(blob, 180, 40) + noise).astype(np.uint8))


def reference_matte(model_file, image: Image.Image, size: int, proc: dict) -> np.ndarray:
    """onnxruntime on the file: PIL bilinear resize, /255, (x - mean) / std, NCHW; then sigmoid
    (logit models), bilinear resize of the float matte to the image, min-max (RMBG-1.4), clip."""
    rgb = image.convert("RGB")
    x = np.asarray(rgb.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    x = (x - np.array(proc["mean"], np.float32)) / np.array(proc["std"], np.float32)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0, 0]
    if proc["sigmoid"]:
        raw = 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))
    matte = np.asarray(Image.fromarray(raw.astype(np.float32)).resize(rgb.size, Image.BILINEAR), np.float64)
    if proc["min_max"]:
        matte = (matte - matte.min()) / (matte.max() - matte.min())
    return np.clip(matte, 0, 1)


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


CASES = {"rmbg-tiny": (0, 64, V2), "RMBG-1.4-tiny": (1, 48, V14)}


@pytest.mark.parametrize("model", CASES)
def test_alpha_equals_onnxruntime_with_the_documented_processing(onnx_files, kw, model):
    index, size, proc = CASES[model]
    image = photo()
    cut = remove_background(image, model=model, **kw)
    assert cut.mode == "RGBA" and cut.size == (61, 45)
    rgba = np.asarray(cut)
    np.testing.assert_array_equal(rgba[..., :3], np.asarray(image))  # colours untouched
    want = np.rint(reference_matte(onnx_files[index], image, size, proc) * 255)
    assert np.abs(rgba[..., 3].astype(int) - want).max() <= 1  # float rounding at .5 only
    assert np.mean(rgba[..., 3] != want) < 0.01
    assert len(np.unique(rgba[..., 3])) > 20  # a real, soft matte


def test_mask_both_webp_and_threshold_are_consistent(onnx_files, kw):
    image = photo(seed=3)
    rgba = np.asarray(remove_background(image, **kw))
    mask = np.asarray(remove_background(image, output="mask", **kw))
    assert mask.shape == (45, 61) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, rgba[..., 3])
    both = remove_background_response(image, output="both", **kw)
    assert both["width"] == 61 and both["height"] == 45 and both["format"] == "png"
    np.testing.assert_array_equal(np.asarray(decode(both["image"])), rgba)
    np.testing.assert_array_equal(np.asarray(decode(both["mask"])), mask)
    webp = remove_background_response(image, output="both", output_format="webp", **kw)
    assert base64.b64decode(webp["image"])[8:12] == b"WEBP"
    np.testing.assert_array_equal(np.asarray(decode(webp["image"]).convert("RGBA")), rgba)  # lossless
    np.testing.assert_array_equal(np.asarray(decode(webp["mask"]).convert("L")), mask)

    matte = reference_matte(onnx_files[0], image, 64, V2)
    cut = round(float(np.median(matte)), 3)
    hard = np.asarray(remove_background(image, threshold=cut, **kw))[..., 3]
    assert set(np.unique(hard)) == {0, 255}
    assert np.mean(hard != np.where(matte > cut, 255, 0)) < 0.01
    zero = np.asarray(remove_background(image, threshold=0.0, **kw))[..., 3]
    assert np.mean(zero != np.where(matte > 0.0, 255, 0)) < 0.01  # above 0, not at or above


def _as(mode: str, image: Image.Image) -> bytes:
    buf = io.BytesIO()
    if mode == "P":
        image.convert("P", palette=Image.ADAPTIVE, colors=16).save(buf, format="PNG")
    elif mode == "CMYK":
        image.convert("CMYK").save(buf, format="TIFF")
    elif mode == "RGBA":
        im = image.convert("RGBA")
        im.putalpha(Image.fromarray(np.full(image.size[::-1], 77, np.uint8)))
        im.save(buf, format="PNG")
    else:
        image.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_non_rgb_inputs(onnx_files, kw, mode):
    data = _as(mode, photo(seed=5))
    sent = Image.open(io.BytesIO(data))
    rgb = sent.convert("RGB") if mode != "I;16" else Image.fromarray((np.asarray(sent) >> 8).astype(np.uint8))
    out = np.asarray(remove_background(data, **kw))
    assert out.shape == (45, 61, 4)
    np.testing.assert_array_equal(out[..., :3], np.asarray(rgb.convert("RGB")))  # input alpha replaced
    want = np.rint(reference_matte(onnx_files[0], rgb, 64, V2) * 255)
    assert np.abs(out[..., 3].astype(int) - want).max() <= 1


def test_concurrent_requests_batch_and_answer_like_single_ones(rmbg_server, kw):
    images = [photo(seed=10 + i, h=30 + i, w=50 - i) for i in range(8)]
    singles = {m: [np.asarray(remove_background(im, model=m, **kw)) for im in images] for m in CASES}

    def worker() -> dict:
        info = requests.get(rmbg_server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"})
        return info.json()["families"]["rmbg"]["workers"][0]

    before = {int(k): v for k, v in worker()["forward_batch_sizes"].get("remove", {}).items()}
    for model in CASES:
        with ThreadPoolExecutor(8) as pool:
            together = list(
                pool.map(lambda im, m=model: np.asarray(remove_background(im, model=m, **kw)), images)
            )
        for a, b in zip(singles[model], together, strict=True):
            np.testing.assert_array_equal(a, b)
    now = worker()
    after = {int(k): v for k, v in now["forward_batch_sizes"]["remove"].items()}
    # these requests shared forwards, differently sized images too
    assert any(n > 1 and v > before.get(n, 0) for n, v in after.items()), (before, after)
    assert now["onnx"]["rmbg-tiny"]["dynamic_batch"] is True
    assert now["onnx"]["RMBG-1.4-tiny"] == {
        "providers": ["CPUExecutionProvider"],
        "input_size": 48,
        "dynamic_batch": False,
    }


def test_seed_request_and_answer_shape(rmbg_server):
    """Seed 000: POST /remove {image: base64} -> {image: base64 RGBA PNG}."""
    r = requests.post(
        rmbg_server.url + "/rmbg/remove",
        json={"image": encode_image(photo())},
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    )
    assert r.status_code == 200
    body = r.json()
    assert decode(body["image"]).mode == "RGBA" and "mask" not in body
    assert body["model"] == "rmbg-tiny"


BAD = {
    "not base64": ({"image": "%%%"}, 400, "base64"),
    "not an image": ({"image": base64.b64encode(b"hello world").decode()}, 400, "image"),
    "unknown output": ({"output": "alpha"}, 422, "'rgba', 'mask' or 'both'"),
    "unknown format": ({"output_format": "jpeg"}, 422, "'png' or 'webp'"),
    "threshold above 1": ({"threshold": 1.5}, 422, "threshold"),
    "unknown model": ({"model": "rmbg-9"}, 400, "offers: rmbg-tiny, RMBG-1.4-tiny"),
    "unknown field": ({"alpha_matting": True}, 422, "alpha_matting"),
    "path input off": ({"image": None, "image_path": "/etc/hosts"}, 400, "disabled"),
    "two images": ({"image_url": "http://example.com/a.png"}, 422, "exactly one"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_a_4xx_that_says_what_to_fix(kw, case):
    extra, status, words = BAD[case]
    body = {k: v for k, v in {"image": encode_image(photo()), **extra}.items() if v is not None}
    with pytest.raises(VisionServeError) as err:
        post("rmbg", "remove", body, **kw)
    assert err.value.status == status
    assert words in err.value.message
    assert remove_background(photo(), **kw).size == (61, 45)  # still serving


def test_oversized_answer_is_refused_with_its_size(kw):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1300, 3), dtype=np.uint8))
    with pytest.raises(VisionServeError) as err:
        remove_background_response(big, output="both", **kw)
    assert err.value.status == 400 and err.value.code == "response_too_large"
    assert "over this server's limit of 4 MiB" in err.value.message


def test_folder_cli(tmp_path, kw, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    photo(seed=1).save(src / "a.jpg")
    photo(seed=2).save(src / "sub" / "b.png")
    (src / "broken.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("skip me")
    args = [str(src), str(tmp_path / "out"), "--base-url", kw["base_url"], "--api-key", KEYS[0]]
    assert rmbg_cli([*args, "--workers", "2"]) == 1  # one image failed
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "a.png",
        "sub/b.png",
    ]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "a.png")), np.asarray(remove_background(src / "a.jpg", **kw))
    )
    assert "broken.png" in capsys.readouterr().err
    (src / "broken.png").unlink()
    assert rmbg_cli([*args, "--mode", "mask"]) == 0  # existing results skipped
    assert "0 written" in capsys.readouterr().out
