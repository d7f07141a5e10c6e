"""DINO route end to end: real server subprocess, real client, values against timm directly.

The server loads tiny DINOv2 models (the real timm classes) from files written here: two in
Meta's torch.hub format (one with registers) and one timm state dict. References run timm's
own forward on the same weights; for models without registers the positional table is first
resized the way the torch.hub model does it, which is what the server must reproduce.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from clients import dino_client as dc
from tests.conftest import KEYS, ServerProcess
from tests.references import randomized_pca_rgb, resample, svd_pca_rgb

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEPTH, DIM = 4, 64
ARCHS = {"tiny": "vit_small_patch14_dinov2", "tiny_reg": "vit_small_patch14_reg4_dinov2"}
TINY = {"img_size": 56, "depth": DEPTH, "embed_dim": DIM, "num_heads": 2}


def build(arch: str, seed: int, **extra):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **TINY, **extra)
    with torch.no_grad():  # timm zero-inits some tokens; make every parameter matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def to_hub_format(model) -> dict:
    """The key layout of Meta's dinov2_*_pretrain.pth files."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, DIM)
    if "reg_token" in sd:  # hub: class position inside pos_embed, registers named differently
        cls_pos = 0.1 * torch.randn(1, 1, DIM)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos[:, 0]
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    return sd


@pytest.fixture(scope="module")
def dino_models(assets):
    """name -> (reference timm model, arch config path, weights file)."""
    out = {}
    for name, arch, seed, fmt in [
        ("dinov2_tiny14", ARCHS["tiny"], 1, "hub"),
        ("dinov2_tiny14_reg", ARCHS["tiny_reg"], 2, "hub"),
        ("dinov2_tiny14_timm", ARCHS["tiny"], 3, "timm"),
    ]:
        model = build(arch, seed)
        cfg = assets / f"{name}.json"
        cfg.write_text(json.dumps({"architecture": arch, **TINY}))
        weights = assets / f"{name}.pth"
        torch.save(to_hub_format(model) if fmt == "hub" else model.state_dict(), weights)
        out[name] = (model, cfg, weights)
    return out


@pytest.fixture(scope="module")
def dino_server(tmp_path_factory, dino_models, image_root):
    config = {
        "limits": {"max_response_bytes": 8 * 1024 * 1024, "max_tokens": 4096},
        "inputs": {"path": {"roots": [str(image_root)]}},
        "dino": {
            "max_batch_size": 16,
            "batch_timeout": 0.1,
            "models": [
                {"name": name, "weights": str(w), "arch_config": str(c), "aliases": [name.upper()]}
                for name, (_, c, w) in dino_models.items()
            ],
        },
    }
    server = ServerProcess(config, tmp_path_factory.mktemp("dino-server"), ["--api-key", KEYS[0]])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def kw(dino_server):
    return {"base_url": dino_server.url + "/dino", "api_key": KEYS[0]}


#: the request's padding_mode -> numpy's name for the same rule
NUMPY_PAD = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def model_input(img: Image.Image, padding: str = "constant") -> torch.Tensor:
    """The normalised image padded bottom/right to a multiple of 14 by numpy's ``padding``."""
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    h, w = x.shape[:2]
    x = np.pad(x, ((0, (-h) % 14), (0, (-w) % 14), (0, 0)), mode=NUMPY_PAD[padding])
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def hub_pos_embed(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """torch.hub DINOv2 (no registers), written from its rule: the M x M table is resized with
    ``scale_factor = (g + 0.1) / M`` (so the output is g cells and the sampling positions are
    ``(o + 0.5) * M / (g + 0.1) - 0.5``), bicubic without antialias; numpy, not F.interpolate."""
    if grid == native:
        return pos
    table = pos[0, 1:].reshape(*native, -1).numpy()
    inv = (native[0] / (grid[0] + 0.1), native[1] / (grid[1] + 0.1))
    table = torch.from_numpy(resample(table, grid, "bicubic", inv)).float()
    return torch.cat([pos[:, :1], table.reshape(1, grid[0] * grid[1], -1)], dim=1)


def reference(
    model,
    img: Image.Image,
    stride: int,
    facet: str,
    layer: int,
    hub_pos: bool = True,
    padding: str = "constant",
) -> np.ndarray:
    """timm's dynamic-size forward at ``stride``; the facet read by hooks on the block's modules,
    key/query/value in the seed's channel order (see ``seed_order``)."""
    arch = model.pretrained_cfg["architecture"]
    m = timm.create_model(arch, num_classes=0, dynamic_img_size=True, **TINY).eval()
    m.load_state_dict(model.state_dict())
    m.patch_embed.proj.stride = (stride, stride)
    x = model_input(img, padding)
    grid = (1 + (x.shape[2] - 14) // stride, 1 + (x.shape[3] - 14) // stride)
    if hub_pos and m.num_reg_tokens == 0:
        native = tuple(m.patch_embed.grid_size)
        m.pos_embed = torch.nn.Parameter(hub_pos_embed(m.pos_embed.detach(), native, grid))
        m.patch_embed.grid_size = grid  # timm then uses the table as is
    seen = {}
    blk = m.blocks[layer]
    hooks = [
        blk.register_forward_hook(lambda _m, _i, o: seen.__setitem__("token", o)),
        blk.attn.qkv.register_forward_hook(lambda _m, _i, o: seen.__setitem__("qkv", o)),
    ]
    with torch.no_grad():
        m.forward_features(x)
    for h in hooks:
        h.remove()
    heads = m.blocks[0].attn.num_heads
    t = seen["token"] if facet == "token" else seed_order(seen["qkv"], heads, facet)
    return t[0, m.num_prefix_tokens :].reshape(*grid, -1).numpy()


def seed_order(qkv: torch.Tensor, heads: int, facet: str) -> torch.Tensor:
    """The seed's (dino-vit-features') facet from a qkv projection output (B, N, 3 * D): q, k, v
    as (B, heads, tokens, head_dim), each token flattened head_dim-major (channel d * heads + h)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    chosen = {"query": q, "key": k, "value": v}[facet]
    return chosen.permute(0, 2, 3, 1).reshape(b, n, -1)


def log_bin_loops(f: np.ndarray) -> np.ndarray:
    """Log-binning (hierarchy 2) as the dino-vit-features paper describes it, one cell at a time
    in numpy: level 0 the 3x3 neighbour cells, level 1 the 8 cells at offsets of 3, each the mean
    of the 3x3 window around it over the positions inside the grid; a neighbour off the grid
    takes the nearest edge cell's value."""
    h, w, d = f.shape

    def mean3(i: int, j: int) -> np.ndarray:
        rows = range(max(i - 1, 0), min(i + 2, h))
        cols = range(max(j - 1, 0), min(j + 2, w))
        return np.mean([f[r, c] for r in rows for c in cols], axis=0)

    out = np.zeros((h, w, 17 * d), dtype=np.float32)
    for y in range(h):
        for x in range(w):
            parts = []
            for level, step in enumerate((1, 3)):
                for i in (y - step, y, y + step):
                    for j in (x - step, x, x + step):
                        if level and (i, j) == (y, x):
                            continue
                        i2, j2 = min(max(i, 0), h - 1), min(max(j, 0), w - 1)
                        parts.append(f[i2, j2] if level == 0 else mean3(i2, j2))
            out[y, x] = np.concatenate(parts)
    return out


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", ["dinov2_tiny14", "dinov2_tiny14_reg", "dinov2_tiny14_timm"])
@pytest.mark.parametrize("facet", ["token", "key"])
@pytest.mark.parametrize("stride", [14, 7])
def test_values_equal_timm_on_the_same_weights(rgb_image, dino_models, kw, name, facet, stride):
    got = dc.extract_dino_features_decoded(rgb_image, model_type=name, facet=facet, stride=stride, **kw)
    want = reference(dino_models[name][0], rgb_image, stride, facet, -1)
    assert got.shape == want.shape == ((4, 5, DIM) if stride == 14 else (7, 9, DIM))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", list(NUMPY_PAD))
def test_padding_mode_equals_numpy_padding_of_the_normalised_image(rgb_image, dino_models, kw, mode):
    """45x61 pixels padded to 56x70: the padding reaches the last row and column of patches."""
    got = dc.extract_dino_features_decoded(rgb_image, model_type="dinov2_tiny14", padding_mode=mode, **kw)
    want = reference(dino_models["dinov2_tiny14"][0], rgb_image, 14, "token", -1, padding=mode)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if mode != "constant":
        other = reference(dino_models["dinov2_tiny14"][0], rgb_image, 14, "token", -1)
        assert np.abs(want - other).max() > 1e-2, "the modes must give different answers here"


def test_query_value_and_middle_layer_equal_timm(rgb_image, dino_models, kw):
    model = dino_models["dinov2_tiny14_reg"][0]
    for facet, layer in [("query", 1), ("value", -3), ("token", 0)]:
        got = dc.extract_dino_features_decoded(
            rgb_image, model_type="dinov2_tiny14_reg", facet=facet, layer=layer, **kw
        )
        np.testing.assert_allclose(got, reference(model, rgb_image, 14, facet, layer), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binned", [False, True])
@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("facet", ["key", "query", "value"])
def test_qkv_facets_come_in_the_seeds_channel_order(rgb_image, dino_models, kw, facet, layer, binned):
    model = dino_models["dinov2_tiny14"][0]
    want = reference(model, rgb_image, 7, facet, layer)
    # the projection's own order (h * head_dim + d) holds the same numbers, elsewhere
    heads = model.blocks[0].attn.num_heads
    own = want.reshape(7, 9, DIM // heads, heads).swapaxes(-1, -2).reshape(7, 9, DIM)
    assert not np.allclose(own, want, atol=1e-3)
    if binned:
        want = log_bin_loops(want)
    got = dc.extract_dino_features_decoded(
        rgb_image, model_type="dinov2_tiny14", facet=facet, layer=layer, stride=7, bin=binned, **kw
    )
    assert got.shape == want.shape == (7, 9, (17 if binned else 1) * DIM)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_positional_interpolation_is_the_hubs_not_timms(rgb_image, dino_models, kw):
    """Without registers the hub resizes differently from timm; at the native grid both agree."""
    model = dino_models["dinov2_tiny14"][0]
    got = dc.extract_dino_features_decoded(rgb_image, model_type="dinov2_tiny14", **kw)
    timm_default = reference(model, rgb_image, 14, "token", -1, hub_pos=False)
    assert np.abs(got - timm_default).max() > 1e-3
    square = rgb_image.crop((0, 0, 45, 45)).resize((56, 56))  # 4x4 grid = the model's own
    got = dc.extract_dino_features_decoded(square, model_type="dinov2_tiny14", **kw)
    np.testing.assert_allclose(
        got, reference(model, square, 14, "token", -1, hub_pos=False), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(("stride", "facet"), [(7, "token"), (14, "key")])
def test_log_binning_equals_the_per_cell_definition(rgb_image, dino_models, kw, stride, facet):
    """Binned features against the per-cell definition applied to timm's own features."""
    model = dino_models["dinov2_tiny14"][0]
    binned = dc.extract_dino_features_decoded(
        rgb_image, model_type="dinov2_tiny14", stride=stride, facet=facet, bin=True, **kw
    )
    want = log_bin_loops(reference(model, rgb_image, stride, facet, -1))
    assert binned.shape == want.shape == ((7, 9) if stride == 7 else (4, 5)) + (17 * DIM,)
    np.testing.assert_allclose(binned, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("params", "shape"),
    [
        ({"facet": "value", "layer": -1}, (4, 5, DIM)),
        ({"facet": "query", "layer": 1}, (4, 5, DIM)),
        ({"stride": 7, "bin": True}, (7, 9, 17 * DIM)),
        ({"stride": 14, "bin": True, "facet": "key"}, (4, 5, 17 * DIM)),
        ({"stride": 2}, (22, 29, DIM)),  # 1 + (56 - 14) / 2, 1 + (70 - 14) / 2
        ({"model_type": "dinov2_tiny14_reg", "stride": 7, "layer": -2}, (7, 9, DIM)),
        ({"ret_patches": False}, (45, 61, DIM)),
        ({"ret_patches": False, "tensor_format": "CHW"}, (DIM, 45, 61)),
        ({"tensor_format": "CHW", "stride": 7}, (DIM, 7, 9)),
        ({"ret_pca": True, "bin": True}, (4, 5, 3)),
        ({"load_size": 30}, (3, 3, DIM)),  # 30x40 -> padded 42x42
        ({"load_size": -2, "stride": 7}, (13, 17, DIM)),  # 90x122 -> padded 98x126
    ],
)
def test_output_shapes(rgb_image, kw, params, shape):
    r = dc.extract_dino_features(rgb_image, **{"model_type": "dinov2_tiny14", **params}, **kw)
    assert tuple(r["shape"]) == shape and r["dtype"] == "float32"
    assert r["is_pca"] is bool(params.get("ret_pca"))
    assert dc.decode_features(r["features"], r["shape"]).shape == shape


def test_layouts_and_upsampling_agree(rgb_image, kw):
    args = {"model_type": "dinov2_tiny14_reg", "stride": 7}
    hwc = dc.extract_dino_features_decoded(rgb_image, ret_patches=False, **args, **kw)
    chw = dc.extract_dino_features_decoded(rgb_image, ret_patches=False, tensor_format="CHW", **args, **kw)
    np.testing.assert_array_equal(chw.transpose(1, 2, 0), hwc)
    grid = dc.extract_dino_features_decoded(rgb_image, **args, **kw)
    up = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(56, 70), mode="bilinear")
    np.testing.assert_allclose(hwc, up[0, :, :45, :61].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic", "area"])
def test_upsampling_a_stride_7_grid_follows_each_modes_rule(rgb_image, kw, mode):
    """7x9 cells over 56x70 pixels: scales of 8 and 7.8, where the modes' conventions differ."""
    args = {"model_type": "dinov2_tiny14", "stride": 7}
    grid = dc.extract_dino_features_decoded(rgb_image, **args, **kw)
    got = dc.extract_dino_features_decoded(
        rgb_image, ret_patches=False, interpolation_mode=mode, **args, **kw
    )
    np.testing.assert_allclose(got, resample(grid, (56, 70), mode)[:45, :61], rtol=1e-5, atol=1e-5)


def test_pca_is_deterministic_and_equals_an_svd_of_timm_features(rgb_image, dino_models, kw):
    a = dc.extract_dino_features(rgb_image, ret_pca=True, stride=7, **kw)
    b = dc.extract_dino_features(rgb_image, ret_pca=True, stride=7, **kw)
    assert a["features"] == b["features"] and a["is_pca"] is True
    x = dc.decode_features(a["features"], a["shape"])
    assert x.shape == (7, 9, 3) and x.min() >= 0 and x.max() <= 1 and x.std() > 0.05
    feats = reference(dino_models["dinov2_tiny14"][0], rgb_image, 7, "token", -1)
    exact = dc.extract_dino_features_decoded(
        rgb_image, ret_pca=True, stride=7, pca_niter=100, pca_q_min=0.05, pca_q_max=0.9, **kw
    )
    np.testing.assert_allclose(exact, svd_pca_rgb(feats, 0.05, 0.9), atol=5e-3)
    few = {}
    for niter in (1, 3):  # not converged: each niter has its own answer
        few[niter] = dc.extract_dino_features_decoded(
            rgb_image, ret_pca=True, stride=7, pca_niter=niter, **kw
        )
        np.testing.assert_allclose(few[niter], randomized_pca_rgb(feats, niter, 0.01, 0.99), atol=5e-3)
    assert np.abs(few[1] - few[3]).max() > 0.05


def test_defaults_spelling_and_image_path(rgb_image, image_root, kw):
    default = dc.extract_dino_features(rgb_image, **kw)
    assert default["model"] == "dinov2_tiny14" and default["shape"] == [4, 5, DIM]
    upper = dc.extract_dino_features(rgb_image, model_type="DINOV2-TINY14", stride=14, **kw)
    assert upper["features"] == default["features"]
    by_path = dc.extract_dino_features(image_path=str(image_root / "photo.png"), **kw)
    by_b64 = dc.extract_dino_features(Image.open(image_root / "photo.png"), **kw)
    assert by_path["features"] == by_b64["features"]


def test_concurrent_equal_shapes_run_as_one_forward(dino_server, rgb_image, dino_models, kw):
    imgs = [Image.fromarray(np.roll(np.asarray(rgb_image), i, axis=1)) for i in range(12)]

    def batches() -> dict[int, int]:
        info = requests.get(dino_server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"})
        sizes = info.json()["families"]["dino"]["workers"][0]["forward_batch_sizes"].get("extract", {})
        return {int(k): v for k, v in sizes.items()}

    before = batches()
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda im: dc.extract_dino_features_decoded(im, facet="key", **kw), imgs))
    after = batches()
    model = dino_models["dinov2_tiny14"][0]
    for im, out in list(zip(imgs, outs, strict=True))[:3]:
        np.testing.assert_allclose(out, reference(model, im, 14, "key", -1), rtol=1e-4, atol=1e-4)
    assert any(n > 1 and after[n] > before.get(n, 0) for n in after), (before, after)  # this test's batches


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        ({"model_type": "dinov2_vitl14"}, 400, "this server offers: dinov2_tiny14, dinov2_tiny14_reg"),
        ({"stride": 5}, 400, "stride 5 does not divide the patch size 14; use one of [1, 2, 7, 14]"),
        ({"stride": 0}, 422, "stride"),
        ({"layer": 4}, 400, "layer 4 is out of range: dinov2_tiny14 has 4 blocks"),
        ({"layer": -5}, 400, "use 0..3 or -4..-1"),
        ({"facet": "attn"}, 422, "facet"),
        ({"tensor_format": "NHWC"}, 422, "tensor_format"),
        (
            {"stride": 1, "load_size": 80},
            400,
            "71x99 patch grid (7029 tokens), over this server's limit of 4096",
        ),
        ({"ret_patches": False, "bin": True, "load_size": 200}, 400, "response would carry"),
    ],
)
def test_bad_inputs_get_a_clear_4xx(rgb_image, kw, params, status, needle):
    with pytest.raises(dc.VisionServeError) as err:
        dc.extract_dino_features(rgb_image, **params, **kw)
    assert err.value.status == status
    assert needle in err.value.message
    assert dc.extract_dino_features(rgb_image, **kw)["shape"] == [4, 5, DIM]  # still serving


@pytest.mark.parametrize("load_size, grid", [(30, (3, 3)), (-2, (7, 9)), (None, (4, 5))])
def test_load_size_equals_torchvision_resize_then_timm(rgb_image, dino_models, kw, load_size, grid):
    """As CLIP: the shorter side to load_size (negative: times itself), bicubic, then timm."""
    got = dc.extract_dino_features_decoded(rgb_image, model_type="dinov2_tiny14", load_size=load_size, **kw)
    img = rgb_image
    if load_size is not None:
        img = TF.resize(img, load_size if load_size > 0 else -load_size * 45, TF.InterpolationMode.BICUBIC)
    want = reference(dino_models["dinov2_tiny14"][0], img, 14, "token", -1)
    assert got.shape == (*grid, DIM)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_float16_and_npy_carry_the_float32_values(dino_server, rgb_image, kw):
    """output_dtype and response_format on DINO, as on CLIP: float16 halves the bytes and rounds
    the same values; npy carries exactly the JSON's values."""
    args = {"model_type": "dinov2_tiny14", "ret_patches": False}
    f32 = dc.extract_dino_features(rgb_image, **args, **kw)
    f16 = dc.extract_dino_features(rgb_image, output_dtype="float16", **args, **kw)
    assert f16["dtype"] == "float16" and len(f16["features"]) < 0.55 * len(f32["features"])
    want = dc.decode_features(f32["features"], f32["shape"])
    half = dc.decode_features(f16["features"], f16["shape"], "float16")
    np.testing.assert_array_equal(half, want.astype(np.float16))
    for dtype, values in (("float32", want), ("float16", half)):
        npy = dc.extract_dino_features(rgb_image, output_dtype=dtype, response_format="npy", **args, **kw)
        assert npy["array"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(npy["array"], values)
