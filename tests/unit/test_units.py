"""Plain-function checks of the shared plumbing (no server): sizes, PCA, registry, input safety."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
import zlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFile

from apis.clip.api import clip_key
from apis.clip.schemas import ClipExtractRequest
from apis.config import load_config
from apis.core.dense import pca_rgb, resized_size
from apis.core.errors import APIError
from apis.core.images import _png_has_chunk, decode_image, probe_image
from apis.core.registry import ModelRegistry
from apis.core.settings import Limits, ModelEntry, PathInput, UrlInput
from apis.dino.model import HUB_TO_TIMM, architecture
from apis.families import FAMILIES
from apis.family import Job
from apis.http.inputs import _pick_address, read_path
from apis.http.middleware import BearerAuth
from apis.sam2.model import Sam2Predictor, connected_components
from apis.sam2.options import variant_name
from apis.sam2.schemas import Sam2PromptRequest
from tests.conftest import ROOT
from tests.references import randomized_pca_rgb, svd_pca_rgb


@pytest.mark.parametrize(
    ("size", "load_size", "want"),
    [
        ((61, 45), 100, (135, 100)),
        ((45, 61), 100, (100, 135)),
        ((61, 45), -1, (61, 45)),
        ((61, 45), -2, (122, 90)),
        ((61, 45), None, (61, 45)),
        ((640, 480), 1024, (1365, 1024)),
    ],
)
def test_load_size_rule(size, load_size, want):
    assert resized_size(*size, load_size) == want


def test_pca_equals_numpy_svd_up_to_the_documented_sign_and_scaling():
    for seed in range(4):  # each component's sign is a coin toss without the rule: 12 tosses
        rng = np.random.default_rng(seed)
        # three strong directions plus noise: the low-rank iteration converges to the exact ones
        basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
        coeff = rng.normal(size=(99, 3)) * [10.0, 5.0, 2.5]
        feats = (coeff @ basis + 0.01 * rng.normal(size=(99, 16))).reshape(9, 11, 16)
        for q_min, q_max in [(0.01, 0.99), (0.2, 0.7), (0.0, 1.0)]:
            got = pca_rgb(torch.from_numpy(feats).float(), 5, q_min, q_max).numpy()
            np.testing.assert_allclose(got, svd_pca_rgb(feats, q_min, q_max), atol=1e-3)


@pytest.mark.parametrize("shape", [(9, 11, 16), (3, 5, 40)])  # more cells than channels, and fewer
def test_pca_niter_runs_that_many_power_iterations(shape):
    """Gaussian features (a flat spectrum): the iteration is far from converged at small niter,
    so every niter gives its own answer and only the numpy randomized PCA of that niter fits."""
    feats = np.random.default_rng(0).normal(size=shape)
    answers = {}
    for niter in (1, 2, 10, 100):
        got = pca_rgb(torch.from_numpy(feats).float(), niter, 0.01, 0.99).numpy()
        np.testing.assert_allclose(got, randomized_pca_rgb(feats, niter, 0.01, 0.99), atol=1e-4)
        answers[niter] = got
    assert np.abs(answers[1] - answers[2]).max() > 0.1 and np.abs(answers[2] - answers[100]).max() > 0.1


def test_pca_is_deterministic_whatever_the_global_seed():
    feats = torch.randn(9, 11, 16)
    a, b = pca_rgb(feats, 5, 0.01, 0.99), pca_rgb(feats.clone(), 5, 0.01, 0.99)
    assert a.shape == (9, 11, 3) and torch.equal(a, b)
    torch.manual_seed(123)  # the global RNG state must not matter
    torch.testing.assert_close(pca_rgb(feats, 5, 0.01, 0.99), a)


def test_registry_spellings_and_unknown_model_message():
    entries = [
        ModelEntry(name="ViT-L-14-336-quickgelu", pretrained="openai"),
        ModelEntry(name="ViT-B-16", pretrained="laion2b_s34b_b88k", aliases=[["b16", "laion"]]),
    ]
    reg = ModelRegistry("clip", entries, ("model_name", "model_pretrained"), key=clip_key)
    assert reg.resolve(None, None) is entries[0]
    assert reg.resolve("ViT-L-14-336", "openai") is entries[0]
    assert reg.resolve("vit_l_14_336_quickgelu", "OpenAI") is entries[0]
    assert reg.resolve("B16", "LAION") is entries[1]
    with pytest.raises(APIError) as e:
        reg.resolve("ViT-H-14", None)
    assert e.value.status == 400
    assert "ViT-L-14-336-quickgelu/openai, ViT-B-16/laion2b_s34b_b88k" in e.value.message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "::1"])
def test_url_input_refuses_non_public_addresses(host):
    with pytest.raises(APIError) as e:
        _pick_address(host, 80, UrlInput(enabled=True))
    assert "non-public" in e.value.message


def test_url_allow_list():
    cfg = UrlInput(enabled=True, allowed_hosts=["127.0.0.1", "*.example.org"])
    assert _pick_address("127.0.0.1", 80, cfg) == "127.0.0.1"  # explicitly listed IP may be private
    with pytest.raises(APIError, match="allow-list"):
        _pick_address("10.0.0.1", 80, cfg)


def test_path_input_refuses_escaping_symlinks_and_devices(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(b"data")
    os.symlink("/etc/hostname", root / "escape.png")
    cfg = PathInput(roots=[root])
    assert read_path(str(root / "ok.png"), cfg, 100) == b"data"
    assert read_path("ok.png", cfg, 100) == b"data"
    for bad in (str(root / "escape.png"), str(root / ".." / "root" / ".." / "x"), "/dev/zero"):
        with pytest.raises(APIError, match="inside one of"):
            read_path(bad, cfg, 100)
    os.symlink("/dev/zero", root / "dev")
    with pytest.raises(APIError):
        read_path(str(root / "dev"), PathInput(roots=[root, "/dev"]), 100)
    with pytest.raises(APIError, match="413|limit"):
        read_path("ok.png", cfg, 2)


def test_bearer_check():
    auth = BearerAuth(None, ["k1", "k2"], lambda p: False)
    assert auth._problem(b"Bearer k2") is None
    assert auth._problem(b"bearer k1") is None
    assert auth._problem(b"Bearer k3") == "invalid API key"
    assert "Bearer scheme" in auth._problem(b"Token k1")
    assert auth._problem(None).startswith("missing")


def test_dino_hub_names_map_to_timm_architectures():
    assert architecture(ModelEntry(name="dinov2_vitl14"))[0] == "vit_large_patch14_dinov2.lvd142m"
    assert architecture(ModelEntry(name="DINOv2-ViTg14-reg"))[0] == "vit_giant_patch14_reg4_dinov2.lvd142m"
    assert HUB_TO_TIMM == {  # the eight torch.hub entry points, spelled out
        "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
        "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
        "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
        "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
        "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
        "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
        "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
        "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
    }
    assert set(HUB_TO_TIMM.values()) <= set(timm.list_pretrained("*dinov2*"))  # names timm knows
    with pytest.raises(ValueError, match="use a torch.hub name"):
        architecture(ModelEntry(name="dinov2_vith14"))


def test_probe_reports_the_size_after_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="JPEG", exif=exif.tobytes())
    limits = Limits()
    assert probe_image(buf.getvalue(), limits) == (30, 40) == decode_image(buf.getvalue(), limits).size


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("where", ["before IDAT", "after IDAT"])
def test_probe_finds_png_exif_rotation_before_and_after_the_image_data(where):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    png, raw = buf.getvalue(), exif.tobytes()[6:]  # eXIf holds the TIFF data without "Exif\0\0"
    at = png.index(b"IDAT" if where == "before IDAT" else b"IEND") - 4  # start of that chunk
    data = png[:at] + _png_chunk(b"eXIf", raw) + png[at:]
    limits = Limits()
    assert probe_image(data, limits) == (30, 40) == decode_image(data, limits).size


def test_png_chunk_walk_finds_chunks_across_many_image_data_chunks():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    assert png.count(b"IDAT") > 2  # Pillow splits the image data into 64 KB chunks
    at = png.index(b"IEND") - 4
    assert not _png_has_chunk(png, b"eXIf")
    assert _png_has_chunk(png[:at] + _png_chunk(b"eXIf", b"MM") + png[at:], b"eXIf")
    assert _png_has_chunk(png[: len(png) // 2], b"eXIf")  # cut short: cannot tell, so look properly


def test_probe_of_a_png_without_exif_reads_the_header_only(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: loads.append(im) or real_load(im))
    assert probe_image(buf.getvalue(), Limits()) == (40, 30)
    assert loads == []
    assert decode_image(buf.getvalue(), Limits()).size == (40, 30)
    assert loads  # decoding does load the pixels


@pytest.mark.parametrize(
    ("text", "variant"),
    [
        ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_l"),
        ("./checkpoints/sam2.1_hiera_large.pt", "sam2.1_hiera_l"),
        ("facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_b+"),
        ("sam2_hiera_base_plus.pt", "sam2_hiera_b+"),
        ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_s"),
        ("SAM2.1_Hiera_Tiny", "sam2.1_hiera_t"),
        ("my-finetune.pt", "my_finetune"),
        ("  ", None),
    ],
)
def test_sam2_variant_spellings(text, variant):
    assert variant_name(text) == variant


def test_sam2_connected_components_match_opencv_per_mask():
    import cv2
    import numpy as np

    masks = torch.from_numpy(np.random.default_rng(0).random((4, 1, 17, 23)) > 0.55)
    labels, areas = connected_components(masks)
    for i in range(4):
        _, lab, stats, _ = cv2.connectedComponentsWithStats(
            masks[i, 0].numpy().astype(np.uint8), connectivity=8
        )
        assert np.array_equal(areas[i, 0].numpy(), np.where(lab > 0, stats[lab, cv2.CC_STAT_AREA], 0))
        assert np.array_equal(labels[i, 0].numpy() > 0, lab > 0)


@pytest.mark.parametrize("size", ["t", "s", "b+", "l"])
@pytest.mark.parametrize("version", ["sam2", "sam2.1"])
def test_sam2_released_variants_map_to_package_configs(version, size):
    from pathlib import Path

    import sam2

    from apis.sam2.model import architecture

    config, overrides = architecture(ModelEntry(name=f"{version}_hiera_{size}"))
    assert config == f"configs/{version}/{version}_hiera_{size}.yaml" and overrides == []
    assert (Path(sam2.__file__).parent / config).is_file()


def test_affinity_keys_name_the_image_id_and_model_of_the_routes_that_cache_images():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    sam2, sam3, clip = (FAMILIES[f].api_class()(cfg) for f in ("sam2", "sam3", "clip"))
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="PNG")
    png = buf.getvalue()
    image = base64.b64encode(png).decode()
    click = {"point_coords": [[1, 1]], "point_labels": [1]}
    job = sam2.job_for(sam2.handlers["prompt_mask"], Sam2PromptRequest(image=image, **click))
    assert job.image_id == hashlib.sha256(png).hexdigest() and job.image_bytes == png
    by_id = sam2.job_for(
        sam2.handlers["prompt_mask"], Sam2PromptRequest(image_id=job.image_id.upper(), **click)
    )
    assert (by_id.image_id, by_id.image_bytes) == (job.image_id, None)
    assert job.request.image is None and job.request.point_coords == [[1, 1]]  # the bytes travel once
    key = sam2.affinity(job)
    assert (
        key
        == sam2.affinity(by_id)
        == sam2.affinity(Job("auto_mask", job.model_id, None, image_id=job.image_id))
    )
    assert key != sam2.affinity(Job("prompt_mask", job.model_id, None, image_id="0" * 64))
    assert key != sam2.affinity(Job("prompt_mask", "m2", None, image_id=job.image_id))  # a cache per model
    assert sam3.affinity(Job("predict", "m", None, image_id=job.image_id)) is not None
    extract = clip.job_for(clip.handlers["extract"], ClipExtractRequest(image=image))
    assert extract.image_id is None  # CLIP caches no image
    assert clip.affinity(Job("extract", "m", None, png, image_id=job.image_id)) is None
    assert sam3.affinity(Job("predict", "m", None, None)) is None
    # route_by_image: false: no key, so the dispatcher sends each request to the least busy worker
    for family, route in (("sam2", "prompt_mask"), ("sam3", "predict")):
        off = load_config(ROOT / "configs" / "demo.yaml")
        getattr(off, family).route_by_image = False
        api = FAMILIES[family].api_class()(off)
        assert api.affinity(Job(route, job.model_id, None, image_id=job.image_id)) is None


@pytest.mark.parametrize(
    ("prompt_threads", "parallel", "threads", "prompts", "plan"),
    [
        (0, 0, 2, 1, (1, 2)),  # a lone click on all the worker's threads
        (0, 0, 2, 4, (2, 1)),  # four share two threads, one each
        (0, 0, 8, 2, (2, 4)),  # two share eight, four each
        (0, 3, 8, 5, (3, 2)),  # at most three at once
        (1, 0, 2, 1, (1, 1)),  # a fixed count: one thread even alone
        (1, 0, 2, 4, (2, 1)),
        (2, 0, 8, 9, (4, 2)),
        (1, 1, 2, 4, (1, 1)),  # one after another
    ],
)
def test_sam2_thread_plan(prompt_threads, parallel, threads, prompts, plan) -> None:
    """How a batch's prompts share the CPU: (prompts decoded at once, torch threads for each)."""
    before = torch.get_num_threads()
    holder = type("Holder", (), {"prompt_threads": prompt_threads, "parallel_prompts": parallel})()
    torch.set_num_threads(threads)
    try:
        assert Sam2Predictor.thread_plan(holder, prompts) == plan
    finally:
        torch.set_num_threads(before)
