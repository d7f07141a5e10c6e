"""SAM 3 pieces without a server: architecture, checkpoint checks, CPU compatibility, instance
rules, and the client's mask helpers."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch.overrides import TorchFunctionMode

from apis.core.encodings import coco_rle, largest_polygon, png_base64
from apis.sam3 import internals as sam3_internals
from apis.sam3.model import Detections, Filters, Sam3Arch, build_sam3_image, instances, load_checkpoint
from clients.sam3_client import decode_instance_mask, decode_instance_masks, save_instances_overlay
from tests.conftest import ROOT

TINY = ROOT / "configs" / "models" / "sam3-tiny.json"


def _settings(model: torch.nn.Module) -> dict[str, dict]:
    """Every module's plain settings (heads, window sizes, dropout, eps, flags...): what a
    constructor argument changes when it keeps every parameter's shape."""
    plain = (int, float, bool, str, type(None))
    out = {}
    for name, m in model.named_modules():
        out[name] = {
            k: v
            for k, v in vars(m).items()
            if k != "training"
            and (isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v)))
        }
    return out


class NoRandomInit(TorchFunctionMode):
    """Random fills return their tensor untouched. The comparison below reads names, shapes and
    settings, never values, and on CPU the full model's ``uniform_`` draws are most of its build
    time (11 of 14 s for sam3's builder)."""

    # torch.nn.init's functions are dispatched to the mode whole (nothing inside them reaches it)
    FILLS = frozenset(
        {"uniform_", "normal_", "erfinv_", "trunc_normal_"}
        | {f"{name}_{kind}_" for name in ("kaiming", "xavier") for kind in ("uniform", "normal")}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def test_default_architecture_is_the_released_one():
    """Same parameter names and shapes as sam3's own builder, so facebook/sam3's sam3.pt loads,
    and the same settings in every module (a constructor argument that keeps shapes)."""
    from sam3.model_builder import build_sam3_image_model

    sam3_internals.install()  # the library's builder allocates on "cuda" otherwise
    with NoRandomInit():
        lib = build_sam3_image_model(bpe_path=sam3_internals.bpe_path(), device="cpu", load_from_HF=False)
    want = {k: tuple(v.shape) for k, v in lib.state_dict().items()}
    want_settings = _settings(lib)
    del lib
    gc.collect()
    with NoRandomInit():
        ours = build_sam3_image(Sam3Arch())
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(got) > 1000
    assert got == want
    got_settings = _settings(ours)
    assert got_settings.keys() == want_settings.keys()
    differ = {
        k: (got_settings[k], want_settings[k]) for k in got_settings if got_settings[k] != want_settings[k]
    }
    assert not differ, list(differ.items())[:3]


def test_checkpoints_that_do_not_fit_are_refused(tmp_path):
    torch.manual_seed(0)
    model = build_sam3_image(Sam3Arch.from_json(TINY))
    sam3_internals.init_untrained(model)  # no NaNs from torch.empty, so tensors compare equal
    state = model.state_dict()

    plain = tmp_path / "plain.pt"
    torch.save(state, plain)  # a bare Sam3Image state dict loads too
    other = build_sam3_image(Sam3Arch.from_json(TINY))
    load_checkpoint(other, plain)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values(), strict=True))

    missing = tmp_path / "missing.pt"
    torch.save(
        {"model": {f"detector.{k}": v for k, v in state.items() if "segmentation_head" not in k}}, missing
    )
    with pytest.raises(ValueError, match=r"missing keys \(e\.g\. \['segmentation_head"):
        load_checkpoint(build_sam3_image(Sam3Arch.from_json(TINY)), missing)

    extra = tmp_path / "extra.pt"
    torch.save({**state, "not_a_layer.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match="1 unexpected keys"):
        load_checkpoint(build_sam3_image(Sam3Arch.from_json(TINY)), extra)

    wider = Sam3Arch.from_json(TINY).__class__(**{**Sam3Arch.from_json(TINY).__dict__, "d_model": 64})
    with pytest.raises(ValueError, match="does not fit the configured architecture"):
        load_checkpoint(build_sam3_image(wider), plain)


def test_unknown_architecture_fields_are_refused(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text('{"d_model": 32, "depth": 3}')
    with pytest.raises(ValueError, match=r"unknown SAM 3 architecture fields \['depth'\]"):
        Sam3Arch.from_json(path)


def test_cpu_compatibility_patches():
    from sam3.model.position_encoding import PositionEmbeddingSine

    sam3_internals.install()
    sam3_internals.install()  # idempotent
    pos = PositionEmbeddingSine(num_pos_feats=32, normalize=True, precompute_resolution=224)
    if not torch.cuda.is_available():
        assert pos.cache == {}  # skipped, filled on first use instead
        t = torch.zeros(3)
        assert t.pin_memory() is t
    out = pos(torch.zeros(1, 1, 14, 14))
    assert out.shape == (1, 32, 14, 14) and (14, 14) in pos.cache
    model = build_sam3_image(Sam3Arch.from_json(TINY))
    sam3_internals.init_untrained(model)
    text = model.backbone.language_backbone.encoder
    assert torch.isfinite(text.positional_embedding).all() and text.positional_embedding.std() > 0
    sam3_internals.move_caches(model, torch.device("cpu"))
    assert model.transformer.decoder.compilable_cord_cache[0].device.type == "cpu"


# ----------------------------------------------------------------------------- instance rules


def _detections() -> tuple[Detections, list[np.ndarray]]:
    """Four queries on a 20x30 image whose masks are known exactly: a logit of +-8 per pixel on
    a grid as fine as the image, so upsampling keeps every pixel's sign."""
    h, w = 20, 30
    masks = [np.zeros((h, w), bool) for _ in range(4)]
    masks[0][2:12, 3:13] = True  # 100 px square
    masks[1][5:8, 20:24] = True  # 12 px
    masks[2][:, :] = False  # empty
    masks[3][10:20, 0:30] = True  # 300 px, box runs off the image
    logits = torch.tensor(np.stack(masks), dtype=torch.float32) * 16 - 8
    det = Detections(
        scores=torch.tensor([0.7, 0.9, 0.95, 0.6]),
        boxes=torch.tensor(
            [[0.27, 0.35, 0.33, 0.5], [0.73, 0.33, 0.13, 0.15], [0.5, 0.5, 1, 1], [0.5, 0.9, 1.2, 0.6]]
        ),
        mask_logits=logits,
    )
    return det, masks


def test_instance_rules_order_clipping_area_and_filters():
    det, masks = _detections()
    got = instances(det, 20, 30, "x", Filters(score_threshold=0.5, min_area=0, epsilon_factor=0.0))
    assert [r["score"] for r in got] == pytest.approx([0.9, 0.7, 0.6])  # best first; empty mask dropped
    assert [r["area"] for r in got] == [12, 100, 300]
    assert got[2]["bbox"] == pytest.approx([0, 12, 30, 20])  # clipped to the image
    assert sorted(map(tuple, got[1]["polygon"])) == [(3, 2), (3, 11), (12, 2), (12, 11)]
    assert [r["score"] for r in instances(det, 20, 30, "x", Filters(score_threshold=0.65, min_area=0))] == (
        pytest.approx([0.9, 0.7])
    )
    # min_area compares the polygon's area (9 x 9 for the 10 x 10 square of pixel centres)
    kept = instances(det, 20, 30, "x", Filters(score_threshold=0, min_area=81))
    assert [r["area"] for r in kept] == [100, 300]
    assert [r["area"] for r in instances(det, 20, 30, "x", Filters(score_threshold=0, min_area=82))] == [300]
    with_masks = instances(det, 20, 30, "x", Filters(score_threshold=0, min_area=0, return_masks=True))
    for r, m in zip(with_masks, [masks[1], masks[0], masks[3]], strict=True):
        np.testing.assert_array_equal(decode_instance_mask(r), m)
    # max_instances counts what passed the other filters, best score first
    assert instances(det, 20, 30, "x", Filters(score_threshold=0, min_area=0, max_instances=2)) == got[:2]
    one = instances(det, 20, 30, "x", Filters(score_threshold=0, min_area=82, max_instances=1))
    assert [r["area"] for r in one] == [300]


def test_polygon_simplification():
    disc = np.zeros((80, 80), np.uint8)
    yy, xx = np.mgrid[:80, :80]
    disc[(yy - 40) ** 2 + (xx - 40) ** 2 < 30**2] = 1
    disc[2:5, 2:5] = 1  # a smaller second region: not the largest
    exact, exact_area = largest_polygon(disc, 0.0)
    rough, _ = largest_polygon(disc, 0.05)
    assert len(exact) > 4 * len(rough) >= 12
    assert all(abs(np.hypot(x - 40, y - 40) - 30) < 2 for x, y in rough)
    assert exact_area == pytest.approx(np.pi * 29.5**2, rel=0.03)
    assert largest_polygon(np.zeros((5, 5), bool), 0.02) is None


# ----------------------------------------------------------------------------- client helpers


def test_client_mask_decoders_match_pycocotools_and_png():
    rng = np.random.default_rng(0)
    masks = [rng.random((23, 31)) > 0.5, np.zeros((23, 31), bool), np.ones((23, 31), bool)]
    results = []
    for m in masks:
        rle = coco_rle(m)
        coco = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(coco, m)
        for data, fmt in ((rle, "rle"), (rle["counts"], "rle"), (png_base64(m), "png")):
            inst = {"polygon": [], "mask": {"data": data, "format": fmt, "shape": [23, 31]}}
            np.testing.assert_array_equal(decode_instance_mask(inst), m)
        results.append(
            {
                "polygon": [[1, 1], [20, 1], [20, 15]],
                "mask": {"data": rle, "format": "rle", "shape": [23, 31]},
            }
        )
    stacked = decode_instance_masks({"image_size": {"width": 31, "height": 23}, "results": results})
    assert stacked.shape == (3, 23, 31) and stacked.dtype == bool
    assert decode_instance_masks({"image_size": {"width": 31, "height": 23}, "results": []}).shape == (
        0,
        23,
        31,
    )
    with pytest.raises(ValueError, match="return_masks=True"):
        decode_instance_mask({"polygon": []})


def test_overlay_shows_masks_and_polygons(tmp_path):
    image = np.full((23, 31, 3), 10, np.uint8)
    mask = np.zeros((23, 31), bool)
    mask[5:10, 5:10] = True
    response = {
        "image_size": {"width": 31, "height": 23},
        "results": [
            {
                "polygon": [[5, 5], [9, 5], [9, 9], [5, 9]],
                "mask": {"data": coco_rle(mask), "format": "rle", "shape": [23, 31]},
            },
            {"polygon": [[15, 15], [28, 15], [28, 20]]},
        ],
    }
    out = np.asarray(Image.open(save_instances_overlay(image, response, tmp_path / "o.png")))
    assert out.shape == (23, 31, 3)
    assert (out[7, 7] != 10).any()  # inside the mask: blended
    assert (out[15, 20] != 10).any()  # on the second polygon's edge: drawn
    assert (out[2, 25] == 10).all()  # elsewhere: untouched


def _library_builder_with_sizes(monkeypatch, arch: Sam3Arch) -> torch.nn.Module:
    """sam3's own ``build_sam3_image_model`` with only the size arguments of its constructors
    replaced by ``arch``'s (widths, depths, heads, queries, resolution): every other argument
    (flags, activations, temperatures, scale factors...) is the library's."""
    import sam3.model_builder as mb

    d = arch.d_model
    sizes = {
        "ViT": {
            "img_size": arch.resolution,
            "pretrain_img_size": arch.pretrain_img_size,
            "patch_size": arch.patch_size,
            "embed_dim": arch.vit_dim,
            "depth": arch.vit_depth,
            "num_heads": arch.vit_heads,
            "mlp_ratio": arch.vit_mlp_ratio,
            "window_size": arch.window_size,
            "global_att_blocks": arch.global_att_blocks,
        },
        "PositionEmbeddingSine": {"num_pos_feats": d},
        "Sam3DualViTDetNeck": {"d_model": d},
        "VETextEncoder": {
            "d_model": d,
            "width": arch.text_width,
            "heads": arch.text_heads,
            "layers": arch.text_layers,
        },
        "TransformerEncoderLayer": {"d_model": d, "dim_feedforward": arch.ffn_dim},
        "MultiheadAttention": {"num_heads": arch.heads, "embed_dim": d},
        "TransformerEncoderFusion": {"num_layers": arch.encoder_layers, "d_model": d},
        "TransformerDecoderLayer": {"d_model": d, "dim_feedforward": arch.ffn_dim, "n_heads": arch.heads},
        "TransformerDecoder": {
            "num_layers": arch.decoder_layers,
            "num_queries": arch.num_queries,
            "d_model": d,
            "resolution": arch.resolution,
            "stride": arch.patch_size,
        },
        "MLP": {"input_dim": d, "hidden_dim": arch.ffn_dim, "output_dim": d},
        "DotProductScoring": {"d_model": d, "d_proj": d},
        "PixelDecoder": {"hidden_dim": d},
        "UniversalSegmentationHead": {"hidden_dim": d},
        "CXBlock": {"dim": d},
        "SequenceGeometryEncoder": {"d_model": d, "num_layers": arch.geometry_layers},
        "TransformerWrapper": {"d_model": d},
    }
    for name, override in sizes.items():
        cls = getattr(mb, name)

        def resized(*args, _cls=cls, _override=override, **kwargs):
            assert not args, f"{_cls.__name__} built with positional arguments"
            assert set(_override) <= set(kwargs), f"{_cls.__name__}: {set(_override) - set(kwargs)}"
            return _cls(**{**kwargs, **_override})

        monkeypatch.setattr(mb, name, resized)

    class _Nn:  # the builder's only positional size: nn.LayerNorm(256) of the scoring MLP
        def __getattr__(self, attr):
            return getattr(torch.nn, attr)

        @staticmethod
        def LayerNorm(width):  # noqa: N802 (torch's name)
            assert width == 256
            return torch.nn.LayerNorm(d)

    monkeypatch.setattr(mb, "nn", _Nn())
    # precompute_resolution=1008 is the released resolution too (skipped on CPU by sam3_internals)
    create_pos = mb._create_position_encoding
    monkeypatch.setattr(
        mb,
        "_create_position_encoding",
        lambda precompute_resolution=None: create_pos(precompute_resolution and arch.resolution),
    )
    return mb.build_sam3_image_model(bpe_path=sam3_internals.bpe_path(), device="cpu", load_from_HF=False)


def test_outputs_equal_sam3s_own_builder_on_the_same_weights(monkeypatch):
    """Our builder against sam3's ``build_sam3_image_model`` at the tiny sizes (only the size
    arguments swapped): the same weights give the same vision features, text features, scores,
    boxes and mask logits through sam3's ``Sam3Processor``, for a text and a box prompt. A
    constructor argument that keeps every shape (an activation, a temperature, a flag) differs."""
    from sam3.model.sam3_image_processor import Sam3Processor

    sam3_internals.install()
    arch = Sam3Arch.from_json(TINY)
    torch.manual_seed(3)
    lib = _library_builder_with_sizes(monkeypatch, arch).eval()
    sam3_internals.init_untrained(lib)
    ours = build_sam3_image(arch).eval()
    ours.load_state_dict(lib.state_dict(), strict=True)
    sam3_internals.move_caches(ours, torch.device("cpu"))

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8))
    outs = []
    for model in (lib, ours):
        proc = Sam3Processor(model, resolution=arch.resolution, device="cpu", confidence_threshold=0.0)
        with torch.inference_mode():
            state = proc.set_image(image)
            fpn = [t.clone() for t in state["backbone_out"]["backbone_fpn"]]
            text = proc.set_text_prompt("a striped cat", state)
            text = {k: text[k].clone() for k in ("scores", "boxes", "masks_logits")}
            feats = model.backbone.forward_text(["a striped cat"], device="cpu")["language_features"].clone()
            proc.reset_all_prompts(state)
            box = proc.add_geometric_prompt([0.4, 0.5, 0.3, 0.4], True, state)
            box = {k: box[k].clone() for k in ("scores", "boxes", "masks_logits")}
        outs.append((fpn, feats, text, box))
    (fpn_a, feats_a, text_a, box_a), (fpn_b, feats_b, text_b, box_b) = outs
    for a, b in zip(fpn_a, fpn_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats_b, feats_a, rtol=1e-5, atol=1e-5)
    for want, got in ((text_a, text_b), (box_a, box_b)):
        assert len(want["scores"]) == arch.num_queries and want["scores"].std() > 0
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


def test_outline_reference_is_the_area_inside_a_contour_walk():
    """``references.outline_area`` (2x2 blocks, no contour walk) equals OpenCV's area of each
    component's external contour on speckled masks, the case where it differs from a pixel count."""
    import cv2

    from tests import references

    rng = np.random.default_rng(0)
    differ_from_pixels = 0
    for _ in range(40):
        mask = rng.random((20, 25)) < rng.uniform(0.3, 0.8)
        for part in references.components(mask):
            contours, _ = cv2.findContours(part.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            filled = references.holes_filled(part)
            assert references.outline_area(filled) == cv2.contourArea(contours[0])
            differ_from_pixels += references.outline_area(filled) != filled.sum()
    assert differ_from_pixels > 100
