"""CLIP routes end to end: real server subprocess, real client, values against open_clip directly."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import pytest
import requests
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from clients import clip_client as cc
from tests.conftest import CLIP_ARCH, KEYS
from tests.references import randomized_pca_rgb, resample, svd_pca_rgb

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PATCH = 14
NUMPY_PAD = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@pytest.fixture(scope="module")
def ref_model(clip_checkpoint):
    open_clip.add_model_config(CLIP_ARCH)
    model = open_clip.create_model("clip-tiny", pretrained=str(clip_checkpoint))
    return model.eval()


@pytest.fixture
def kw(clip_url):
    return {
        "base_url": clip_url,
        "api_key": KEYS[0],
        "model_name": "clip-tiny",
        "model_pretrained": "testfile",
    }


def seed_pos_embed(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """The seed's positional embedding for a (gh, gw) grid (F3RM's recipe, from DINO): bicubic by
    scale factors (g + 0.1) / s of the native s x s table, which samples other positions than
    resizing to (gh, gw) exactly; the native grid keeps the table."""
    s = int(math.sqrt(pos.shape[0] - 1))
    if (gh, gw) == (s, s):
        return pos
    grid = pos[1:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((gh + 0.1) / s, (gw + 0.1) / s),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])


def seed_resize(img: Image.Image, load_size: int | None, center_crop: bool = False) -> Image.Image:
    """load_size > 0: shorter side to load_size, < 0: times |load_size|, None: as is (bicubic);
    then the centred square of the shorter side."""
    if load_size is not None:
        short = load_size if load_size > 0 else -load_size * min(img.size)
        scale = short / min(img.size)
        w, h = (
            (short, int(img.height * scale)) if img.width <= img.height else (int(img.width * scale), short)
        )
        img = img.resize((w, h), Image.BICUBIC)
    if center_crop:
        side = min(img.size)
        left, top = round((img.width - side) / 2), round((img.height - side) / 2)
        img = img.crop((left, top, left + side, top + side))
    return img


def reference_dense(model, img: Image.Image, padding: str = "constant") -> np.ndarray:
    """MaskCLIP dense features written out step by step on open_clip's modules, with the seed's
    positional embedding; the normalised image padded bottom/right by numpy's equivalent of
    ``padding`` (constant pads 0)."""
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    h, w = x.shape[:2]
    x = np.pad(x, ((0, (-h) % PATCH), (0, (-w) % PATCH), (0, 0)), mode=NUMPY_PAD[padding])
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    v = model.visual
    with torch.no_grad():
        t = v.conv1(x)
        gh, gw = t.shape[-2:]
        t = t.reshape(1, t.shape[1], -1).permute(0, 2, 1)
        t = torch.cat([v.class_embedding.reshape(1, 1, -1), t], dim=1)
        t = v.ln_pre(t + seed_pos_embed(v.positional_embedding, gh, gw))
        for blk in v.transformer.resblocks[:-1]:
            t = blk(t)
        last = v.transformer.resblocks[-1]
        _, _, value = F.linear(last.ln_1(t), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(
            3, dim=-1
        )
        out = v.ln_post(last.attn.out_proj(value)[:, 1:]) @ v.proj
    return out.reshape(gh, gw, -1).numpy()


def reference_text(model, text: str) -> np.ndarray:
    with torch.no_grad():
        e = model.encode_text(open_clip.get_tokenizer("clip-tiny")([text]))
    return F.normalize(e, dim=-1)[0].numpy()


# ----------------------------------------------------------------------------- extract


def upsampled(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """The patch grid stretched bilinearly over the padded image, the padding cropped off."""
    padded = (height + (-height) % PATCH, width + (-width) % PATCH)
    x = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=padded, mode="bilinear")
    return x[0, :, :height, :width].permute(1, 2, 0).numpy()


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


SEED_SIZES = {
    "original size": (None, False, (4, 5)),  # 45x61, padded to 56x70
    "load_size 100": (100, False, (8, 10)),  # 100x135, padded to 112x140
    "load_size -2": (-2, False, (7, 9)),  # 90x122, padded to 98x126
    "native grid": (56, True, (4, 4)),  # 56x56: the model's own 4x4 grid, table as is
}


@pytest.mark.parametrize("case", SEED_SIZES)
def test_dense_features_equal_the_seeds_recipe(rgb_image, ref_model, kw, case):
    load_size, crop, grid = SEED_SIZES[case]
    img = seed_resize(rgb_image, load_size, crop)
    want = reference_dense(ref_model, img)
    patches = cc.extract_clip_features_decoded(rgb_image, load_size=load_size, center_crop=crop, **kw)
    assert patches.shape == want.shape == (*grid, 32)
    assert relative_difference(patches, want) <= 1e-5
    pixels = cc.extract_clip_features_decoded(
        rgb_image, load_size=load_size, center_crop=crop, ret_patches=False, **kw
    )
    assert relative_difference(pixels, upsampled(want, img.height, img.width)) <= 1e-5


@pytest.mark.parametrize("case", ["load_size 100", "load_size -2"])
def test_similarity_equals_the_seeds_recipe(rgb_image, ref_model, kw, case):
    load_size, crop, _ = SEED_SIZES[case]
    raw = reference_dense(ref_model, seed_resize(rgb_image, load_size, crop)) @ reference_text(
        ref_model, "a cat"
    )
    got = cc.compute_clip_similarity_decoded(rgb_image, "a cat", load_size=load_size, softmax=0, **kw)
    assert relative_difference(got, raw) <= 1e-5
    soft = cc.compute_clip_similarity_decoded(rgb_image, "a cat", load_size=load_size, **kw)  # softmax 1.0
    z = np.exp(raw - raw.max())
    assert relative_difference(soft, z / z.sum()) <= 1e-5


@pytest.mark.parametrize(
    ("load_size", "center_crop", "grid"),
    [
        (1024, False, (74, 100)),  # 45x61 -> 1024x1388, padded to 1036x1400
        (-1, False, (4, 5)),  # original size 45x61
        (-2, False, (7, 9)),  # 90x122
        (None, False, (4, 5)),
        (100, True, (8, 8)),  # 100x100 crop, padded to 112
        (-1, True, (4, 4)),  # 45x45 crop, padded to 56
    ],
)
def test_extract_load_size_and_crop_equal_torchvision_transforms(
    rgb_image, ref_model, kw, load_size, center_crop, grid
):
    r = cc.extract_clip_features(rgb_image, load_size=load_size, center_crop=center_crop, **kw)
    assert r["shape"] == [*grid, 32] and r["dtype"] == "float32" and r["is_pca"] is False
    got = cc.decode_features(r["features"], r["shape"])
    # torchvision's Resize(int) sets the shorter side; a negative load_size multiplies it
    img = rgb_image
    if load_size is not None:
        img = TF.resize(img, load_size if load_size > 0 else -load_size * 45, TF.InterpolationMode.BICUBIC)
    if center_crop:
        img = TF.center_crop(img, min(img.size))
    np.testing.assert_allclose(got, reference_dense(ref_model, img), rtol=1e-4, atol=1e-4)


def test_ret_patches_false_upsamples_and_unpads_in_both_layouts(rgb_image, kw):
    hwc = cc.extract_clip_features_decoded(rgb_image, load_size=None, ret_patches=False, **kw)
    chw = cc.extract_clip_features_decoded(
        rgb_image, load_size=None, ret_patches=False, tensor_format="CHW", **kw
    )
    assert hwc.shape == (45, 61, 32) and chw.shape == (32, 45, 61)
    np.testing.assert_allclose(chw.transpose(1, 2, 0), hwc, rtol=1e-5, atol=1e-6)
    # upsample the padded 4x5 grid to 56x70 bilinearly, then crop: same numbers
    patches = cc.extract_clip_features_decoded(rgb_image, load_size=None, **kw)
    up = (
        F.interpolate(
            torch.from_numpy(patches).permute(2, 0, 1)[None],
            size=(56, 70),
            mode="bilinear",
            align_corners=False,
        )[0, :, :45, :61]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(hwc, up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic", "area"])
def test_every_interpolation_mode_equals_its_rule(rgb_image, kw, mode):
    """The 4x5 grid stretched over the padded 56x70 input by the mode's rule, then cropped."""
    patches = cc.extract_clip_features_decoded(rgb_image, load_size=None, **kw)
    got = cc.extract_clip_features_decoded(
        rgb_image, load_size=None, ret_patches=False, interpolation_mode=mode, **kw
    )
    want = resample(patches, (56, 70), mode)[:45, :61]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ret_pca_equals_an_svd_of_the_reference_features(rgb_image, ref_model, kw):
    """pca_niter, pca_q_min and pca_q_max in real requests, against numpy's SVD of the direct
    open_clip features (100 power iterations make the low-rank PCA all but exact)."""
    feats = reference_dense(ref_model, rgb_image.resize((271, 200), Image.BICUBIC))
    for q_min, q_max in [(0.01, 0.99), (0.1, 0.8)]:
        got = cc.extract_clip_features_decoded(
            rgb_image, load_size=200, ret_pca=True, pca_niter=100, pca_q_min=q_min, pca_q_max=q_max, **kw
        )
        np.testing.assert_allclose(got, svd_pca_rgb(feats, q_min, q_max), atol=2e-3)
    few = {}
    for niter in (1, 3):  # not converged: each niter has its own answer
        few[niter] = cc.extract_clip_features_decoded(
            rgb_image, load_size=200, ret_pca=True, pca_niter=niter, **kw
        )
        np.testing.assert_allclose(few[niter], randomized_pca_rgb(feats, niter, 0.01, 0.99), atol=2e-3)
    assert np.abs(few[1] - few[3]).max() > 0.05


def test_ret_pca_in_unit_range_and_deterministic(rgb_image, kw):
    a = cc.extract_clip_features(rgb_image, load_size=200, ret_pca=True, **kw)
    b = cc.extract_clip_features(rgb_image, load_size=200, ret_pca=True, **kw)
    assert a["is_pca"] is True and a["shape"] == [15, 20, 3]
    x = cc.decode_features(a["features"], a["shape"])
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
    assert a["features"] == b["features"]
    full = cc.extract_clip_features_decoded(
        rgb_image, load_size=200, ret_pca=True, ret_patches=False, tensor_format="CHW", **kw
    )
    assert full.shape == (3, 200, 271)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_mode_equals_numpy_padding_of_the_normalised_image(rgb_image, ref_model, kw, mode):
    got = cc.extract_clip_features_decoded(rgb_image, load_size=None, padding_mode=mode, **kw)
    np.testing.assert_allclose(got, reference_dense(ref_model, rgb_image, mode), rtol=1e-4, atol=1e-4)


def test_float16_output_halves_bytes_and_matches(rgb_image, kw):
    a = cc.extract_clip_features(rgb_image, load_size=None, **kw)
    b = cc.extract_clip_features(rgb_image, load_size=None, output_dtype="float16", **kw)
    assert b["dtype"] == "float16" and len(b["features"]) < 0.55 * len(a["features"])
    np.testing.assert_allclose(
        cc.decode_features(b["features"], b["shape"], "float16"),
        cc.decode_features(a["features"], a["shape"]),
        rtol=2e-3,
        atol=2e-3,
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_npy_responses_carry_the_same_values_in_fewer_bytes(clip_server, rgb_image, kw, dtype):
    common = {"load_size": None, "output_dtype": dtype, "ret_pca": True}
    js = cc.extract_clip_features(rgb_image, **common, **kw)
    npy = cc.extract_clip_features(rgb_image, response_format="npy", **common, **kw)
    assert npy["array"].dtype == np.dtype(dtype) and list(npy["array"].shape) == js["shape"]
    np.testing.assert_array_equal(npy["array"], cc.decode_features(js["features"], js["shape"], dtype))
    assert npy["model"] == js["model"] == "clip-tiny/testfile" and npy["is_pca"] is True
    sim = cc.compute_clip_similarity(rgb_image, "a cat", load_size=None, response_format="npy", **kw)
    want = cc.compute_clip_similarity_decoded(
        rgb_image, "a cat", load_size=None, response_format="json", **kw
    )
    np.testing.assert_array_equal(sim["array"], want)
    # on the wire: the raw body, not base64
    body = {"image": cc.encode_image(rgb_image), "load_size": None, "output_dtype": dtype}
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    raw = requests.post(
        clip_server.url + "/clip/extract", json={**body, "response_format": "npy"}, headers=headers
    )
    as_json = requests.post(clip_server.url + "/clip/extract", json=body, headers=headers)
    assert raw.headers["content-type"] == "application/x-npy"
    assert raw.headers["x-visionserve-model"] == "clip-tiny/testfile"
    assert len(raw.content) < 0.8 * len(as_json.content)


def test_image_path_and_image_url_inputs(kw, image_root, image_host, rgb_image):
    by_b64 = cc.extract_clip_features_decoded(Image.open(image_root / "photo.png"), load_size=None, **kw)
    by_path = cc.extract_clip_features(image_path=str(image_root / "photo.png"), load_size=None, **kw)
    by_url = cc.extract_clip_features(image_url=f"{image_host}/photo.png", load_size=None, **kw)
    np.testing.assert_array_equal(cc.decode_features(by_path["features"], by_path["shape"]), by_b64)
    np.testing.assert_array_equal(cc.decode_features(by_url["features"], by_url["shape"]), by_b64)


# ----------------------------------------------------------------------------- text


def test_encode_text_equals_direct_and_is_normalised(ref_model, kw):
    r = cc.encode_clip_text("a photo of a robot arm", **kw)
    assert r["shape"] == [32] and r["model"] == "clip-tiny/testfile"
    emb = cc.decode_text_embedding(r["text_embedding"], r["shape"])
    np.testing.assert_allclose(emb, reference_text(ref_model, "a photo of a robot arm"), rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)


def batch_counts(server, counter: str, route: str) -> dict[int, int]:
    """{batch size: batches of that size so far} of the one worker's ``counter``."""
    info = requests.get(server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    sizes = info["families"]["clip"]["workers"][0][counter].get(route, {})
    return {int(k): v for k, v in sizes.items()}


def grew_with_size_above_one(before: dict[int, int], after: dict[int, int]) -> bool:
    """Whether batches larger than one were added between the two readings."""
    return any(n > 1 and after[n] > before.get(n, 0) for n in after)


def test_concurrent_encode_text_runs_as_batches(clip_server, ref_model, kw):
    texts = [f"object number {i}" for i in range(24)]
    before = batch_counts(clip_server, "batch_sizes", "encode_text")
    with ThreadPoolExecutor(24) as pool:
        embs = list(pool.map(lambda t: cc.encode_clip_text_decoded(t, **kw), texts))
    after = batch_counts(clip_server, "batch_sizes", "encode_text")
    for t, e in zip(texts[:3], embs[:3], strict=True):
        np.testing.assert_allclose(e, reference_text(ref_model, t), rtol=1e-4, atol=1e-5)
    assert grew_with_size_above_one(before, after), (before, after)


def test_spellings_share_one_loaded_instance(clip_server, rgb_image, kw):
    spellings = [("clip-tiny", "testfile"), ("CLIP_TINY", "TestFile"), ("tiny-clip", "test_file")]
    outs = []
    for name, pre in spellings:
        r = cc.encode_clip_text("same", **{**kw, "model_name": name, "model_pretrained": pre})
        assert r["model"] == "clip-tiny/testfile"
        outs.append(r["text_embedding"])
    assert len(set(outs)) == 1
    other = cc.encode_clip_text("same", **{**kw, "model_pretrained": "random"})
    assert other["model"] == "clip-tiny/random" and other["text_embedding"] != outs[0]
    info = requests.get(clip_server.url + "/info", headers={"Authorization": f"Bearer {KEYS[1]}"}).json()
    assert info["families"]["clip"]["workers"][0]["models_loaded"] == [
        "clip-tiny/random",
        "clip-tiny/testfile",
    ]
    assert info["random_weights"] is True
    weights = {m["id"]: m for m in info["families"]["clip"]["models"]}
    assert (
        weights["clip-tiny/random"]["random_weights"] and not weights["clip-tiny/testfile"]["random_weights"]
    )


# ----------------------------------------------------------------------------- similarity


def test_similarity_softmax_and_raw(rgb_image, ref_model, kw):
    feats = reference_dense(ref_model, rgb_image)
    text = reference_text(ref_model, "a cat")
    raw = cc.compute_clip_similarity_decoded(rgb_image, "a cat", load_size=None, softmax=0, **kw)
    np.testing.assert_allclose(raw, feats @ text, rtol=1e-4, atol=1e-4)
    neg = cc.compute_clip_similarity_decoded(rgb_image, "a cat", load_size=None, softmax=-1.0, **kw)
    np.testing.assert_array_equal(neg, raw)
    soft = cc.compute_clip_similarity_decoded(rgb_image, "a cat", load_size=None, softmax=2.0, **kw)
    z = np.exp(2.0 * (raw - raw.max()))
    np.testing.assert_allclose(soft, z / z.sum(), rtol=1e-4, atol=1e-7)
    assert soft.sum() == pytest.approx(1.0, abs=1e-5)


def test_similarity_softmax_does_not_overflow(rgb_image, kw):
    m = cc.compute_clip_similarity_decoded(rgb_image, "a cat", load_size=None, softmax=1e6, **kw)
    assert np.isfinite(m).all() and m.sum() == pytest.approx(1.0, abs=1e-5)


def test_similarity_full_resolution_cosine_and_negatives(rgb_image, ref_model, kw):
    """Full resolution: the raw patch map upsampled (bilinear by default) over the padded input,
    cropped, then the spatial softmax (default temperature 1) over every pixel."""
    raw = reference_dense(ref_model, rgb_image) @ reference_text(ref_model, "a cat")
    for mode, temperature in [("bilinear", 1.0), ("nearest", 5.0)]:
        full = cc.compute_clip_similarity_decoded(
            rgb_image,
            "a cat",
            load_size=None,
            ret_patches=False,
            interpolation_mode=mode,
            **({"softmax": temperature} if temperature != 1.0 else {}),
            **kw,
        )
        up = resample(raw[..., None], (56, 70), mode)[:45, :61, 0]
        z = np.exp(temperature * (up - up.max()))
        assert full.shape == (45, 61)
        np.testing.assert_allclose(full, z / z.sum(), rtol=1e-3, atol=1e-8)
    cos = cc.compute_clip_similarity_decoded(
        rgb_image, "a cat", load_size=None, softmax=0, similarity="cosine", **kw
    )
    feats = reference_dense(ref_model, rgb_image)
    want = (feats / np.linalg.norm(feats, axis=-1, keepdims=True)) @ reference_text(ref_model, "a cat")
    np.testing.assert_allclose(cos, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [None, 3.0])
def test_relevancy_equals_the_lerf_formula(rgb_image, ref_model, kw, temperature):
    """LERF: for each negative, softmax over (positive, negative) cosine x temperature, keep the
    positive's share; the answer is the smallest share over the negatives."""
    negatives = ["object", "stuff", "things"]
    extra = {} if temperature is None else {"relevancy_temperature": temperature}
    rel = cc.compute_clip_similarity_decoded(
        rgb_image, "a cat", load_size=None, negatives=negatives, softmax=2.0, similarity="dot", **extra, **kw
    )
    feats = reference_dense(ref_model, rgb_image).astype(np.float64)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    t = 10.0 if temperature is None else temperature
    pos = t * feats @ reference_text(ref_model, "a cat")
    shares = [
        np.exp(pos) / (np.exp(pos) + np.exp(t * feats @ reference_text(ref_model, n))) for n in negatives
    ]
    assert rel.shape == (4, 5)
    np.testing.assert_allclose(rel, np.min(shares, axis=0), rtol=1e-4, atol=1e-5)


def test_concurrent_extracts_of_one_size_share_a_forward(clip_server, rgb_image, ref_model, kw):
    imgs = [Image.fromarray(np.roll(np.asarray(rgb_image), i, axis=0)) for i in range(10)]
    before = batch_counts(clip_server, "forward_batch_sizes", "extract")
    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(lambda im: cc.extract_clip_features_decoded(im, load_size=None, **kw), imgs))
    after = batch_counts(clip_server, "forward_batch_sizes", "extract")
    for im, out in list(zip(imgs, outs, strict=True))[:3]:
        np.testing.assert_allclose(out, reference_dense(ref_model, im), rtol=1e-4, atol=1e-4)
    assert grew_with_size_above_one(before, after), (before, after)
