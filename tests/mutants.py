"""Mutation checks: run deliberately wrong implementations against the tests that must catch them.

Not collected by pytest (the name does not start with ``test_``). Each mutant replaces one
snippet of the code in a scratch copy of the working tree, then runs the named tests there
(the server subprocesses the tests start import the copy too) and expects them to fail.

    .venv/bin/python tests/mutants.py              # every mutant, one after the other
    .venv/bin/python tests/mutants.py pca relevancy  # those whose name contains a word
    .venv/bin/python tests/mutants.py --list

A test given as ``file::-k words`` runs that file's tests matching the words. Prints a table
``mutant | tests | killed/survived``; exits 1 if a mutant survived. A full run takes about an
hour on two cores (most mutants start their own servers); one mutant takes seconds (decoder,
keys, limits) to a few minutes (SAM 2 auto_mask, the demo server's client checks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or -k expressions after "::-k ")
    why: str


MUTANTS = [
    Mutant(
        "pool lock is a no-op",
        "clients/sam3_client.py",
        "self._lock = threading.Lock()",
        "self._lock = __import__('contextlib').nullcontext()",
        ("tests/http/test_sam3_pool.py::test_pool_is_thread_safe_about_its_turns",),
        "item 1: the turn counter is read and written without the lock",
    ),
    Mutant(
        "pca: fixed random projection",
        "apis/core/dense.py",
        "        _, _, v = torch.pca_lowrank(x, q=q, center=False, niter=niter)",
        "        v = torch.linalg.qr(torch.randn(x.shape[1], q))[0]",
        (
            "tests/unit/test_units.py::test_pca_equals_numpy_svd_up_to_the_documented_sign_and_scaling",
            "tests/http/test_clip_http.py::test_ret_pca_equals_an_svd_of_the_reference_features",
        ),
        "item 2: a random orthonormal projection with quantile scaling",
    ),
    Mutant(
        "pca: sign not fixed",
        "apis/core/dense.py",
        "    v = v * torch.where(v[idx, torch.arange(q)] < 0, -1.0, 1.0)\n",
        "",
        ("tests/unit/test_units.py::test_pca_equals_numpy_svd_up_to_the_documented_sign_and_scaling",),
        "item 2: the sign rule (largest loading positive) dropped",
    ),
    Mutant(
        "pca: min-max instead of quantiles",
        "apis/core/dense.py",
        "    lo = torch.quantile(proj, q_min, dim=0)\n    hi = torch.quantile(proj, q_max, dim=0)",
        "    lo = proj.amin(dim=0)\n    hi = proj.amax(dim=0)",
        (
            "tests/unit/test_units.py::test_pca_equals_numpy_svd_up_to_the_documented_sign_and_scaling",
            "tests/http/test_clip_http.py::test_ret_pca_equals_an_svd_of_the_reference_features",
        ),
        "item 2: pca_q_min / pca_q_max ignored",
    ),
    Mutant(
        "relevancy: max over negatives",
        "apis/clip/model.py",
        "torch.softmax(pair, dim=-1)[..., 0].amin(dim=-1)",
        "torch.softmax(pair, dim=-1)[..., 0].amax(dim=-1)",
        ("tests/http/test_clip_http.py::test_relevancy_equals_the_lerf_formula",),
        "item 3: max instead of min",
    ),
    Mutant(
        "relevancy: the negative's column",
        "apis/clip/model.py",
        "torch.softmax(pair, dim=-1)[..., 0].amin(dim=-1)",
        "torch.softmax(pair, dim=-1)[..., 1].amin(dim=-1)",
        ("tests/http/test_clip_http.py::test_relevancy_equals_the_lerf_formula",),
        "item 3: the negative's probability",
    ),
    Mutant(
        "relevancy: temperature ignored",
        "apis/clip/model.py",
        "neg], dim=-1) * temperature",
        "neg], dim=-1) * 10.0",
        ("tests/http/test_clip_http.py::test_relevancy_equals_the_lerf_formula",),
        "item 3: relevancy_temperature never used",
    ),
    Mutant(
        "full-res similarity: uniform map",
        "apis/clip/api.py",
        "sim = clip_model.spatial_softmax(sim, r.softmax)",
        "sim = torch.full_like(sim, 1.0 / sim.numel())",
        ("tests/http/test_clip_http.py::test_similarity_full_resolution_cosine_and_negatives",),
        "item 4: a map that sums to 1 and says nothing",
    ),
    Mutant(
        "full-res similarity: softmax before upsampling",
        "apis/clip/api.py",
        """        if not r.ret_patches:
            sim = dense.upsample_grid(sim[..., None], item.geom, r.interpolation_mode)[..., 0]
        if r.softmax > 0 and not r.negatives:
            sim = clip_model.spatial_softmax(sim, r.softmax)""",
        """        if r.softmax > 0 and not r.negatives:
            sim = clip_model.spatial_softmax(sim, r.softmax)
        if not r.ret_patches:
            sim = dense.upsample_grid(sim[..., None], item.geom, r.interpolation_mode)[..., 0]""",
        ("tests/http/test_clip_http.py::test_similarity_full_resolution_cosine_and_negatives",),
        "item 4: the seed's order of steps",
    ),
    Mutant(
        "padding: replicate pads by reflection",
        "apis/core/dense.py",
        "F.pad(x, (0, pw, 0, ph), mode=mode) if",
        "F.pad(x, (0, pw, 0, ph), mode='reflect' if mode == 'replicate' else mode) if",
        ("tests/http/test_clip_http.py::test_padding_mode_equals_numpy_padding_of_the_normalised_image",),
        "item 5: one padding mode mapped to another",
    ),
    Mutant(
        "interpolation: corners aligned",
        "apis/core/dense.py",
        'kwargs = {"align_corners": False} if mode',
        'kwargs = {"align_corners": True} if mode',
        ("tests/http/test_clip_http.py::test_every_interpolation_mode_equals_its_rule",),
        "item 5: bilinear/bicubic with align_corners=True",
    ),
    Mutant(
        "interpolation: nearest-exact read as nearest",
        "apis/core/dense.py",
        "x = F.interpolate(x, size=padded_hw, mode=mode, **kwargs)",
        "x = F.interpolate(x, size=padded_hw, mode=mode.replace('-exact', ''), **kwargs)",
        ("tests/http/test_dino_http.py::test_upsampling_a_stride_7_grid_follows_each_modes_rule",),
        "item 5: two modes that differ only in the pixel-centre convention (equal at CLIP's 14x)",
    ),
    Mutant(
        "center_crop: offset rounded down",
        "apis/core/dense.py",
        "left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))",
        "left, top = (w - side) // 2, (h - side) // 2",
        ("tests/http/test_clip_http.py::test_extract_load_size_and_crop_equal_torchvision_transforms",),
        "item 5: a crop one pixel off torchvision's",
    ),
    Mutant(
        "load_size: bilinear resize",
        "apis/core/dense.py",
        "img = img.resize((w, h), Image.BICUBIC)",
        "img = img.resize((w, h), Image.BILINEAR)",
        ("tests/http/test_clip_http.py::test_extract_load_size_and_crop_equal_torchvision_transforms",),
        "item 5: the wrong resampling filter keeps every shape",
    ),
    Mutant(
        "dino pos-embed: timm's resize for hub models",
        "apis/dino/model.py",
        "    if dm.registers:\n        out = F.interpolate(table, size=grid",
        "    if True:\n        out = F.interpolate(table, size=grid",
        ("tests/http/test_dino_http.py::test_values_equal_timm_on_the_same_weights",),
        "item 10: exact-size antialiased resize where the hub uses (g + 0.1) / M",
    ),
    Mutant(
        "dino pos-embed: offset 0 instead of 0.1",
        "apis/dino/model.py",
        "scale = ((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1])",
        "scale = ((grid[0] + 0.0) / native[0], (grid[1] + 0.0) / native[1])",
        ("tests/http/test_dino_http.py::test_values_equal_timm_on_the_same_weights",),
        "item 10: a shared misreading of the hub's offset",
    ),
    Mutant(
        "log-binning: averages count the padding",
        "apis/dino/model.py",
        "padding=k // 2, count_include_pad=False)",
        "padding=k // 2, count_include_pad=True)",
        ("tests/http/test_dino_http.py::test_log_binning_equals_the_per_cell_definition",),
        "item 10: edge averages divided by 9",
    ),
    Mutant(
        "log-binning: zero padding off the grid",
        "apis/dino/model.py",
        'padded = F.pad(pooled, (k, k, k, k), mode="replicate")',
        "padded = F.pad(pooled, (k, k, k, k))",
        ("tests/http/test_dino_http.py::test_log_binning_equals_the_per_cell_definition",),
        "item 10: neighbours off the grid are zeros instead of the edge cell",
    ),
    Mutant(
        "batching off",
        "apis/transport/worker_loop.py",
        "items = link.collect(lit_api.max_batch_size,",
        "items = link.collect(1,",
        (
            "tests/http/test_clip_http.py::test_concurrent_encode_text_runs_as_batches",
            "tests/http/test_clip_http.py::test_concurrent_extracts_of_one_size_share_a_forward",
        ),
        "item 13: no batching at all",
    ),
    Mutant(
        "auto_mask: m2m ignored",
        "apis/sam2/model.py",
        "(pred.model, output_mode=output_mode, **s)",
        '(pred.model, output_mode=output_mode, **{**s, "use_m2m": False})',
        ("tests/http/test_sam2_http.py::test_auto_mask_equals_the_library_generator_field_by_field",),
        "item 9: fine_grained's mask-to-mask refinement not run",
    ),
    Mutant(
        "auto_mask: no hole filling in the predictor",
        "apis/sam2/model.py",
        'pred.configure(0.0, s["min_mask_region_area"], s["min_mask_region_area"])',
        "pred.configure(0.0, 0.0, 0.0)",
        ("tests/http/test_sam2_http.py::test_auto_mask_equals_the_library_generator_field_by_field",),
        "item 9: min_mask_region_area only as the final filter",
    ),
    Mutant(
        "prompt_mask: hole area used for sprinkles too",
        "apis/sam2/internals.py",
        "pred._transforms.max_sprinkle_area = max_sprinkle_area",
        "pred._transforms.max_sprinkle_area = max_hole_area",
        ("tests/http/test_sam2_http.py::test_hole_and_sprinkle_filling_equal_the_library_predictor",),
        "item 10: a shared misreading of the two areas",
    ),
    Mutant(
        "sam3: first contour, not the largest",
        "apis/core/encodings.py",
        "contour = max(contours, key=cv2.contourArea)",
        "contour = contours[0]",
        ("tests/http/test_sam3_http.py::test_score_threshold_min_area_and_epsilon_including_explicit_zero",),
        "items 6/10: the polygon of another component",
    ),
    Mutant(
        "sam3: polygon simplified with a fixed epsilon",
        "apis/core/encodings.py",
        "approx = cv2.approxPolyDP(contour, epsilon_factor * cv2.arcLength(contour, True), True)",
        "approx = cv2.approxPolyDP(contour, 2.0 * epsilon_factor, True)",
        (
            "tests/http/test_sam3_http.py::"
            "test_exact_polygons_outline_the_largest_component_and_simplify_within_epsilon",
            "tests/http/test_sam3_http.py::test_score_threshold_min_area_and_epsilon_including_explicit_zero",
        ),
        "item 10: epsilon not scaled by the perimeter",
    ),
    Mutant(
        "sam3: batched encodings out of order",
        "apis/sam3/model.py",
        'backbone_fpn=[f[j : j + 1].clone() for f in out["backbone_fpn"]],',
        'backbone_fpn=[f[0:1].clone() for f in out["backbone_fpn"]],',
        (
            "tests/http/test_sam3_http.py::test_concurrent_requests_batch_the_backbone_and_answer_like_the_processor",
        ),
        "item 8: each image of a batch answered with its neighbour's encoding",
    ),
    Mutant(
        "dtype: autocast never entered",
        "apis/core/precision.py",
        "if self.dtype == torch.float32:",
        "if True:",
        (
            "tests/http/test_precision.py::test_float16_clip_and_dino_within_tolerance",
            "tests/http/test_precision.py::test_clip_features_and_text_within_tolerance",
        ),
        "item 11: --dtype accepted and ignored",
    ),
    Mutant(
        "rmbg: threshold 0 gives an all-zero alpha",
        "apis/rmbg/model.py",
        "return np.where(matte > threshold, 255, 0).astype(np.uint8)",
        "return np.where(matte > threshold, 255 * (threshold != 0), 0).astype(np.uint8)",
        ("tests/http/test_rmbg_http.py::test_mask_both_webp_and_threshold_are_consistent",),
        "item 12: an all-zero alpha at threshold 0 (the old set-of-values check passed it)",
    ),
    Mutant(
        "sam3 builder: half the attention heads",
        "apis/sam3/model.py",
        "    heads: int = 8\n",
        "    heads: int = 4\n",
        ("tests/unit/test_sam3_units.py::test_default_architecture_is_the_released_one",),
        "item 7: a constructor argument that keeps every parameter's shape",
    ),
    Mutant(
        "answers: a declared field left out",
        "apis/sam2/api.py",
        '            "num_masks": len(out),\n',
        "",
        ("tests/http/test_openapi_answers.py::test_answer_matches_its_schema[sam2-auto_mask-float32]",),
        "issue 21: answers are rendered as bytes, so nothing else holds them to Sam2AutoMaskResponse",
    ),
    Mutant(
        "answers: a field of the wrong type",
        "apis/sam3/api.py",
        '"image_size": {"width": enc.width,',
        '"image_size": {"width": str(enc.width),',
        ("tests/http/test_openapi_answers.py::test_answer_matches_its_schema[sam3-predict-prompts]",),
        "issue 21: a string where ImageSize declares an integer",
    ),
    Mutant(
        "sam3 builder: gelu in the decoder",
        "apis/sam3/model.py",
        'layer=TransformerDecoderLayer(\n            activation="relu",',
        'layer=TransformerDecoderLayer(\n            activation="gelu",',
        ("tests/unit/test_sam3_units.py::test_outputs_equal_sam3s_own_builder_on_the_same_weights",),
        "item 7: a function-valued argument the settings comparison cannot see",
    ),
    Mutant(
        "sam3 builder: position temperature",
        "apis/sam3/model.py",
        "temperature=10000,",
        "temperature=20000,",
        ("tests/unit/test_sam3_units.py::test_outputs_equal_sam3s_own_builder_on_the_same_weights",),
        "item 7: a number that keeps every shape, at the tiny sizes",
    ),
    Mutant(
        "auto_mask: a threshold applied off by 0.05",
        "apis/sam2/model.py",
        "    s = dict(settings)\n",
        '    s = {**settings, "pred_iou_thresh": settings["pred_iou_thresh"] + 0.05}\n',
        (
            "tests/http/test_sam2_http.py::test_request_defaults_reach_the_generator_as_documented",
            "tests/http/test_sam2_http.py::test_auto_mask_equals_the_library_generator_field_by_field"
            "[thresholds that split the masks]",
        ),
        "item 9: the reported settings are right, the generator gets another threshold",
    ),
    Mutant(
        "auto_mask: fine_grained default stability",
        "apis/sam2/options.py",
        '"stability_score_thresh": 0.92,',
        '"stability_score_thresh": 0.9,',
        ("tests/http/test_sam2_http.py::test_request_defaults_reach_the_generator_as_documented",),
        "item 9: a default preset value that keeps no mask either way with random weights",
    ),
    Mutant(
        "sam3: first contour, against the independent outline",
        "apis/core/encodings.py",
        "contour = max(contours, key=cv2.contourArea)",
        "contour = contours[0]",
        (
            "tests/http/test_sam3_http.py::test_exact_polygons_outline_the_largest_component_and_simplify_within_epsilon",
        ),
        "item 10: the polygon of another component, caught without OpenCV's contours in the reference",
    ),
    Mutant(
        "sam3: largest by pixel count",
        "apis/core/encodings.py",
        "contour = max(contours, key=cv2.contourArea)",
        "contour = max(contours, key=lambda c: int(cv2.drawContours("
        "np.zeros(mask.shape, np.uint8), [c], -1, 1, -1).sum()))",
        (
            "tests/http/test_sam3_http.py::test_exact_polygons_outline_the_largest_component_and_simplify_within_epsilon",
        ),
        "item 10: another reading of 'largest' (the most pixels, not the largest outline)",
    ),
    Mutant(
        "options: --timeout ignored",
        "app.py",
        "queue_timeout=args.timeout,",
        "queue_timeout=300.0,",
        ("tests/http/test_server_options.py::test_a_request_queued_past_the_timeout_gets_504_queue_timeout",),
        "item 4 (server options): the queue timeout left at its default",
    ),
    Mutant(
        "options: lazy loads eagerly",
        "apis/family_worker.py",
        'if self.fam.load == "eager":',
        "if True:",
        ("tests/http/test_server_options.py::test_lazy_loading_models_and_devices",),
        "item 4 (server options): load: lazy accepted and ignored",
    ),
    Mutant(
        "options: key-file comments kept",
        "app.py",
        'line = line.split("#", 1)[0].strip()',
        "line = line.strip()",
        ("tests/http/test_server_options.py::test_keys_from_the_key_file_only",),
        "item 4 (server options): a comment line becomes an accepted key",
    ),
    # issue 32: options and promises checked by their effect
    Mutant(
        "pca: niter ignored",
        "apis/core/dense.py",
        "feats = pca_rgb(feats, r.pca_niter,",
        "feats = pca_rgb(feats, 100,",
        (
            "tests/http/test_clip_http.py::test_ret_pca_equals_an_svd_of_the_reference_features",
            "tests/http/test_dino_http.py::test_pca_is_deterministic_and_equals_an_svd_of_timm_features",
        ),
        "issue 32: every PCA test ran where 100 iterations had converged",
    ),
    Mutant(
        "dino: padding_mode ignored",
        "apis/dino/api.py",
        "patch, r.padding_mode, dense.IMAGENET_MEAN",
        'patch, "constant", dense.IMAGENET_MEAN',
        ("tests/http/test_dino_http.py::test_padding_mode_equals_numpy_padding_of_the_normalised_image",),
        "issue 32: DINO pads with zeros whatever the request says",
    ),
    Mutant(
        "decoder: EXIF orientation 6 turned the other way",
        "apis/core/images.py",
        "        img = ImageOps.exif_transpose(img)\n",
        "        img = ImageOps.exif_transpose(img).transpose(Image.Transpose.ROTATE_180)"
        " if img.getexif().get(0x0112) == 6 else ImageOps.exif_transpose(img)\n",
        ("tests/unit/test_image_decoding.py::-k orientation",),
        "issue 32: 270 degrees where the tag says 90; the size is right",
    ),
    Mutant(
        "decoder: animations from their last frame",
        "apis/core/images.py",
        "        img.load()\n        img = ImageOps",
        '        img.seek(getattr(img, "n_frames", 1) - 1)\n        img.load()\n        img = ImageOps',
        ("tests/unit/test_image_decoding.py::test_animations_decode_to_their_first_frame",),
        "issue 32: the last frame has the first one's size",
    ),
    Mutant(
        "decoder: 16-bit grey divided by 257",
        "apis/core/images.py",
        "0, 65535) >> 8",
        "0, 65535) // 257",
        ("tests/unit/test_image_decoding.py::test_16_bit_grey_keeps_the_top_8_bits",),
        "issue 32: off by one at the top of each bucket",
    ),
    Mutant(
        "decoder: TIFF header size turned twice",
        "apis/core/images.py",
        'if getattr(img, "_tile_size", (w, h)) != (w, h):',
        "if False:",
        ("tests/unit/test_image_decoding.py::-k orientation",),
        "issue 32: the bug the pixel test found (Pillow reports a TIFF's size already oriented)",
    ),
    Mutant(
        "auto_mask: crop_nms_thresh ignored",
        "apis/sam2/model.py",
        "(pred.model, output_mode=output_mode, **s)",
        '(pred.model, output_mode=output_mode, **{**s, "crop_nms_thresh": 0.7})',
        (
            "tests/http/test_sam2_http.py::test_crop_nms_and_overlap_equal_the_library_generator_at_two_values",
        ),
        "issue 32: the default crop NMS whatever the request says",
    ),
    Mutant(
        "auto_mask: crop_overlap_ratio ignored",
        "apis/sam2/model.py",
        "(pred.model, output_mode=output_mode, **s)",
        '(pred.model, output_mode=output_mode, **{**s, "crop_overlap_ratio": 512 / 1500})',
        (
            "tests/http/test_sam2_http.py::test_crop_nms_and_overlap_equal_the_library_generator_at_two_values",
        ),
        "issue 32: the default crop overlap whatever the request says",
    ),
    Mutant(
        "auth: keys compared with ==",
        "apis/http/middleware.py",
        "match |= hmac.compare_digest(token, key)",
        "match |= token == key",
        ("tests/unit/test_guards.py::-k constant_time",),
        "issue 32: SECURITY.md's constant-time comparison",
    ),
    Mutant(
        "auth: early exit on the first matching key",
        "apis/http/middleware.py",
        "match |= hmac.compare_digest(token, key)",
        "match = match or hmac.compare_digest(token, key)",
        ("tests/unit/test_guards.py::-k constant_time",),
        "issue 32: time depends on which key matched",
    ),
    Mutant(
        "logs: an accepted key logged",
        "apis/http/middleware.py",
        'return None if match else "invalid API key"',
        "return (__import__('logging').getLogger('visionserve').warning('key %s', token.decode())"
        ' if match else "invalid API key")',
        (
            "tests/http/test_auth_and_errors.py::"
            "test_keys_never_reach_the_log_and_info_level_prints_no_debug_lines",
        ),
        "issue 32: SECURITY.md's keys never in logs",
    ),
    Mutant(
        "options: --log-level always debug",
        "app.py",
        "configure_logging(args.log_level, args.log_format)",
        'configure_logging("debug", args.log_format)',
        (
            "tests/http/test_auth_and_errors.py::"
            "test_keys_never_reach_the_log_and_info_level_prints_no_debug_lines",
        ),
        "issue 32: --log-level info prints debug lines",
    ),
    Mutant(
        "options: --log-level always info",
        "app.py",
        "configure_logging(args.log_level, args.log_format)",
        'configure_logging("info", args.log_format)',
        ("tests/http/test_server_options.py::test_debug_log_level_prints_debug_lines",),
        "issue 32: --log-level debug ignored",
    ),
    Mutant(
        "dense: tensor_format ignored",
        "apis/core/dense.py",
        'return x.permute(2, 0, 1) if fmt == "CHW" else x',
        "return x",
        ("tests/http/test_dino_http.py::test_layouts_and_upsampling_agree",),
        "issue 32: CHW answered in HWC",
    ),
    Mutant(
        "cache: sam2 cache_size 0 read as 1",
        "apis/sam2/model.py",
        "self.cache: LRUCache[Embedding] = LRUCache(cache_size)",
        "self.cache: LRUCache[Embedding] = LRUCache(max(cache_size, 1))",
        ("tests/http/test_sam2_http.py::-k cache_size_0",),
        "issue 32: the off state of cache_size (LRUCache's own capacity check alone is no mutant:"
        " with it gone, the eviction loop still empties a 0-entry cache)",
    ),
    Mutant(
        "cache: sam3 cache_size 0 read as 1",
        "apis/sam3/model.py",
        "self.cache: LRUCache[Encoded] = LRUCache(cache_size)",
        "self.cache: LRUCache[Encoded] = LRUCache(max(cache_size, 1))",
        ("tests/unit/test_sam3_batching.py::-k cache_size",),
        "issue 32: the off state of cache_size",
    ),
    Mutant(
        "sam2: new images encoded one at a time",
        "apis/sam2/model.py",
        "return self.cache.fetch_or_find(keys, images, encode)",
        "return self.cache.fetch_or_find(keys, images, lambda todo: [e for i in todo for e in encode([i])])",
        ("tests/http/test_sam2_http.py::test_concurrent_prompts_on_new_images_share_one_encoder_pass",),
        "issue 32: grouped requests, but one image-encoder forward per image",
    ),
    Mutant(
        "sam2: a batch's prompts decoded one after another",
        "apis/sam2/model.py",
        "decoded = list(pred.decoders.map(decode, range(len(todo))))",
        "decoded = [decode(j) for j in range(len(todo))]",
        ("tests/http/test_sam2_http.py::test_a_batch_of_prompts_decoded_at_once_equals_the_predictor",),
        "issue 37: parallel_prompts read, but every click of a batch on the worker's one thread",
    ),
    Mutant(
        "sam2: trace_decoder ignored",
        "apis/sam2/model.py",
        'self.trace_decoder = trace_decoder and dtype == torch.float32 and self.device.type == "cpu"',
        "self.trace_decoder = False",
        ("tests/http/test_sam2_http.py::test_a_batch_of_prompts_decoded_at_once_equals_the_predictor",),
        "issue 37: the setting read, the decoder run eagerly all the same",
    ),
    Mutant(
        "sam2: the decoder settings not passed from the config",
        "apis/sam2/api.py",
        "            self.fam.parallel_prompts,\n            self.fam.trace_decoder,",
        "            0,\n            True,",
        ("tests/unit/test_routes_in_process.py::-k settings_reach",),
        "issue 37: parallel_prompts and trace_decoder read from the config, the defaults served",
    ),
    Mutant(
        "sam2: a lone click on one thread",
        "apis/sam2/model.py",
        "each = max(1, threads // width)",
        "each = 1",
        ("tests/unit/test_units.py::-k thread_plan",),
        "issue 37: prompt_threads 0 read as one thread per prompt, even for a lone click",
    ),
    Mutant(
        "sam2: the image's share of the decoder computed at every prompt",
        "apis/sam2/model.py",
        "if mask_input is None and emb.decoder_side is None:",
        "if mask_input is None:",
        ("tests/http/test_sam2_http.py::test_a_batch_of_prompts_decoded_at_once_equals_the_predictor",),
        "issue 37: the same answers, the image's projections recomputed for every click",
    ),
    Mutant(
        "sam3: new images encoded one at a time",
        "apis/sam3/model.py",
        "return self.cache.fetch_or_find(keys, images, encode)",
        "return self.cache.fetch_or_find(keys, images, lambda todo: [e for i in todo for e in encode([i])])",
        ("tests/unit/test_sam3_batching.py::-k cache_size",),
        "issue 32: grouped requests, but one backbone forward per image",
    ),
    Mutant(
        "clients: a default off the server's",
        "clients/dino_client.py",
        "    pca_q_max: float = 0.99,\n",
        "    pca_q_max: float = 0.9,\n",
        ("tests/http/test_openapi_answers.py::-k client_parameters",),
        "issue 32: client defaults equal the server's",
    ),
    Mutant(
        "clients: a request field missing",
        "clients/clip_client.py",
        "    pca_niter: int = 5,\n    pca_q_min: float = 0.01,\n    pca_q_max: float = 0.99,\n    tensor",
        "    pca_q_min: float = 0.01,\n    pca_q_max: float = 0.99,\n    tensor",
        ("tests/http/test_openapi_answers.py::-k client_parameters",),
        "issue 32: compute_clip_similarity lacked pca_niter, pca_q_min/max and tensor_format",
    ),
    Mutant(
        "dino: load_size ignored",
        "apis/dino/api.py",
        "job.image, r.load_size, False, patch",
        "job.image, None, False, patch",
        ("tests/http/test_dino_http.py::test_load_size_equals_torchvision_resize_then_timm",),
        "issue 32: DINO keeps the image's size",
    ),
    Mutant(
        "dense: output_dtype ignored",
        "apis/core/dense.py",
        'arr, "features", r.output_dtype, r.response_format',
        'arr, "features", "float32", r.response_format',
        ("tests/http/test_dino_http.py::test_float16_and_npy_carry_the_float32_values",),
        "issue 32: float16 asked, float32 answered (DINO's test; CLIP's catches it too)",
    ),
    Mutant(
        "dense: npy answered as JSON",
        "apis/core/dense.py",
        'arr, "features", r.output_dtype, r.response_format',
        'arr, "features", r.output_dtype, "json"',
        ("tests/http/test_dino_http.py::test_float16_and_npy_carry_the_float32_values",),
        "issue 32: response_format ignored",
    ),
    Mutant(
        "decoder: EXIF ignored",
        "apis/core/images.py",
        "        img = ImageOps.exif_transpose(img)\n",
        "",
        ("tests/unit/test_image_decoding.py::-k orientation",),
        "issue 32: stored pixels as they are",
    ),
    Mutant(
        "decoder: 16-bit grey clipped to white",
        "apis/core/images.py",
        'if img.mode.startswith("I;16") or img.mode == "I":',
        "if False:",
        ("tests/unit/test_image_decoding.py::test_16_bit_grey_keeps_the_top_8_bits",),
        "issue 32: Pillow's own convert() of I;16",
    ),
    Mutant(
        "probe: EXIF rotation left out of the size",
        "apis/core/images.py",
        "rotated = img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)",
        "rotated = False",
        ("tests/unit/test_image_decoding.py::-k orientation",),
        "issue 32: the header size of a turned JPEG, PNG or WebP",
    ),
    Mutant(
        "clients: dino tensor_format dropped",
        "clients/dino_client.py",
        '    tensor_format: str = "HWC",\n',
        "",
        ("tests/http/test_openapi_answers.py::-k client_parameters",),
        "issue 32: a request field the client cannot send",
    ),
    Mutant(
        "clients: sam2 default preset",
        "clients/sam2_client.py",
        'preset: str = "fine_grained",',
        'preset: str = "coarse",',
        ("tests/http/test_openapi_answers.py::-k client_parameters",),
        "issue 32: client defaults equal the server's",
    ),
    Mutant(
        "clients: rmbg default output",
        "clients/rmbg_client.py",
        '    output: str = "rgba",\n    output_format: str = "png",',
        '    output: str = "mask",\n    output_format: str = "png",',
        ("tests/http/test_openapi_answers.py::-k client_parameters",),
        "issue 32: client defaults equal the server's",
    ),
    Mutant(
        "limits: text limit one over",
        "apis/core/settings.py",
        "max_text_chars: int = Field(2000,",
        "max_text_chars: int = Field(2001,",
        ("tests/unit/test_guards.py::test_default_limits_are_the_numbers_security_md_states",),
        "issue 32: SECURITY.md's limits by their exact numbers",
    ),
    Mutant(
        "limits: body limit in decimal MB",
        "apis/core/settings.py",
        "max_body_bytes: int = Field(64 * MiB,",
        "max_body_bytes: int = Field(64_000_000,",
        ("tests/unit/test_guards.py::test_default_limits_are_the_numbers_security_md_states",),
        "issue 32: SECURITY.md's limits by their exact numbers",
    ),
    Mutant(
        "routing: route_by_image false ignored",
        "apis/family_http.py",
        "job.image_id is None or not self.fam.route_by_image:",
        "job.image_id is None:",
        ("tests/unit/test_units.py::-k affinity",),
        "issue 32: the off state of route_by_image",
    ),
    Mutant(
        "embed: dino output_dtype ignored",
        "apis/dino/api.py",
        "data, shape = encode_array(vectors.images.numpy(), r.output_dtype)",
        'data, shape = encode_array(vectors.images.numpy(), "float32")',
        ("tests/http/test_embeddings_http.py::-k float16",),
        "issue 32: /dino/embed answers float32 bytes whatever output_dtype says",
    ),
    Mutant(
        "embed: clip images output_dtype ignored",
        "apis/clip/api.py",
        "image_data, image_shape = encode_array(vectors.images.numpy(), dtype)",
        'image_data, image_shape = encode_array(vectors.images.numpy(), "float32")',
        ("tests/http/test_embeddings_http.py::-k float16",),
        "issue 32: /clip/embed's image half always float32",
    ),
    Mutant(
        "routing: route_by_image false ignored, over HTTP",
        "apis/family_http.py",
        "job.image_id is None or not self.fam.route_by_image:",
        "job.image_id is None:",
        ("tests/http/test_off_states.py::-k route_by_image",),
        "issue 32: the off state on a real server with two workers",
    ),
    Mutant(
        "cache: sam2 family cache_size not passed",
        "apis/sam2/api.py",
        "self.compute_dtype,\n            self.fam.cache_size,",
        "self.compute_dtype,\n            16,",
        ("tests/http/test_off_states.py::-k sam2_cache_size_0",),
        "issue 32: cache_size: 0 in the config, the loader's default (16) served",
    ),
    Mutant(
        "cache: sam3 family cache_size not passed",
        "apis/sam3/api.py",
        "self.torch_device, self.compute_dtype, self.fam.cache_size)",
        "self.torch_device, self.compute_dtype)",
        ("tests/http/test_off_states.py::-k sam3_cache_size_0",),
        "issue 32: cache_size: 0 in the config, the loader's default (8) served",
    ),
    Mutant(
        "sessions: every call loads the family's default model",
        "apis/video_sessions.py",
        "    endpoint = False\n    uses_model = False\n",
        "    endpoint = False\n    uses_model = True\n",
        ("tests/http/test_sam2_video_http.py::test_session_calls_load_only_the_sessions_model",),
        "a session holds its own model: under load: lazy its calls must not load the default",
    ),
    Mutant(
        "options: eager loads lazily",
        "apis/family_worker.py",
        'if self.fam.load == "eager":',
        "if False:",
        ("tests/http/test_off_states.py::-k eager",),
        "issue 32: load: eager (the off state of lazy) accepted and ignored",
    ),
    Mutant(
        "docs: public_docs always on",
        "apis/server.py",
        "or (cfg.public_docs and path in _DOC_PATHS)",
        "or (path in _DOC_PATHS)",
        ("tests/http/test_auth_and_errors.py::test_health_open_info_and_docs_need_key",),
        "issue 32: the off state (the default) of public_docs",
    ),
    Mutant(
        "metrics: public_metrics always on",
        "apis/server.py",
        'or (cfg.public_metrics and path == "/metrics")',
        'or (path == "/metrics")',
        ("tests/http/test_auth_and_errors.py::test_health_open_info_and_docs_need_key",),
        "issue 32: the off state (the default) of public_metrics",
    ),
    Mutant(
        "models: always the default model",
        "apis/core/registry.py",
        "if all(r is None for r in requested):",
        "if True:",
        (
            "tests/http/test_dino_http.py::test_values_equal_timm_on_the_same_weights",
            "tests/http/test_sam2_http.py::test_model_spellings_select_configured_models_only",
        ),
        "issue 32: model_name / model_type / model_cfg accepted and ignored",
    ),
    Mutant(
        "dino: layer ignored",
        "apis/dino/model.py",
        "layer = layer % dm.depth",
        "layer = dm.depth - 1",
        ("tests/http/test_dino_http.py::test_query_value_and_middle_layer_equal_timm",),
        "issue 32: every facet from the last block",
    ),
    Mutant(
        "dino: query read as key",
        "apis/dino/model.py",
        'i = ("query", "key", "value").index(facet)',
        'i = ("key", "query", "value").index(facet)',
        ("tests/http/test_dino_http.py::test_query_value_and_middle_layer_equal_timm",),
        "issue 32: two facets swapped",
    ),
    Mutant(
        "clip: encode_text not normalised",
        "apis/clip/model.py",
        "_encode_text_prefix(cm.model, tokens[:, :n])\n    return F.normalize(emb.float(), dim=-1)",
        "_encode_text_prefix(cm.model, tokens[:, :n])\n    return emb.float()",
        ("tests/http/test_clip_http.py::test_encode_text_equals_direct_and_is_normalised",),
        "issue 32: /clip/encode_text's documented L2 norm",
    ),
    Mutant(
        "clip text prefix: cut at the shortest prompt",
        "apis/clip/model.py",
        "return int(pooled_at.max()) + 1",
        "return int(pooled_at.min()) + 1",
        ("tests/unit/test_clip_text_prefix.py::test_mixed_lengths_equal_open_clip_encode_text",),
        "issue 32: longer prompts of a batch lose their end",
    ),
    Mutant(
        "prompt_mask: normalize_coords ignored",
        "apis/sam2/api.py",
        "            normalize_coords=r.normalize_coords,\n",
        "            normalize_coords=True,\n",
        ("tests/http/test_sam2_http.py::test_prompt_masks_equal_the_predictor",),
        "issue 32: coordinates always read as pixels",
    ),
    Mutant(
        "prompt_mask: mask_input dropped",
        "apis/sam2/api.py",
        "            mask_input=mask,\n",
        "            mask_input=None,\n",
        ("tests/http/test_sam2_http.py::test_follow_up_with_the_previous_low_res_mask",),
        "issue 32: the previous low-res mask ignored",
    ),
    Mutant(
        "prompt_mask: mask_threshold ignored",
        "apis/sam2/api.py",
        "            mask_threshold=r.mask_threshold,\n",
        "            mask_threshold=0.0,\n",
        ("tests/http/test_sam2_http.py::test_mask_threshold_equals_the_library_predictors",),
        "issue 32: always the library's default threshold",
    ),
    Mutant(
        "masks: packbits in little bit order",
        "apis/sam2/api.py",
        "np.packbits(mask.astype(bool, copy=False).ravel())",
        'np.packbits(mask.astype(bool, copy=False).ravel(), bitorder="little")',
        (
            "tests/http/test_sam2_http.py::test_packbits_prompt_masks_decode_to_the_float32_ones_in_a_smaller_answer",
        ),
        "issue 32: mask_encoding packbits in the other bit order",
    ),
    Mutant(
        "sam3: score_threshold always the configured one",
        "apis/sam3/api.py",
        "score_threshold=fam.score_threshold if r.score_threshold is None else r.score_threshold,",
        "score_threshold=fam.score_threshold,",
        ("tests/http/test_sam3_http.py::test_score_threshold_min_area_and_epsilon_including_explicit_zero",),
        "issue 32: the request's score_threshold ignored",
    ),
    Mutant(
        "sam3: mask_format ignored",
        "apis/sam3/api.py",
        "mask_format=r.mask_format,",
        'mask_format="rle",',
        (
            "tests/http/test_sam3_http.py::test_rle_and_png_masks_decode_to_the_same_mask_and_area_is_its_pixel_count",
        ),
        "issue 32: png masks answered as RLE",
    ),
    Mutant(
        "video: backward tracked forward",
        "apis/sam2/video.py",
        "for result in self._tracked(start, max_frames, reverse=True):",
        "for result in self._tracked(start, max_frames, reverse=False):",
        ("tests/unit/test_sam2_video.py::test_every_frame_equals_the_library",),
        "issue 32: direction backward",
    ),
    Mutant(
        "video: propagate options not sent to the session",
        "apis/video_sessions.py",
        "entry.session.propagate(r.direction, r.start_frame_index, r.max_frames)",
        'entry.session.propagate("forward", None, None)',
        (
            "tests/http/test_sam2_video_http.py::test_backward_from_a_start_frame_and_kept_clicks_equal_the_library",
        ),
        "issue 32: direction, start_frame_index and max_frames over HTTP",
    ),
    Mutant(
        "video: clear_old_points ignored over HTTP",
        "apis/video_sessions.py",
        "clear_old_points=r.clear_old_points,",
        "clear_old_points=True,",
        (
            "tests/http/test_sam2_video_http.py::test_backward_from_a_start_frame_and_kept_clicks_equal_the_library",
        ),
        "issue 32: a second click replaces the first",
    ),
    Mutant(
        "sessions: one more than max_sessions",
        "apis/core/sessions.py",
        "if len(self._entries) >= self.max_sessions:",
        "if len(self._entries) > self.max_sessions:",
        (
            "tests/unit/test_session_store.py::test_least_recently_used_is_evicted_410_and_busy_ones_are_kept_429",
        ),
        "issue 32: video.max_sessions by its number",
    ),
    Mutant(
        "openai: modality image ignored",
        "apis/openai_routes.py",
        'url = req.modality == "image" or not texts_too',
        "url = not texts_too",
        ("tests/http/test_embeddings_http.py::-k modality",),
        "issue 32: image URLs to CLIP read as texts",
    ),
    Mutant(
        "embed: decoded images out of order",
        "apis/vectors.py",
        "pixels = list(pool.map(pixels_of, r.images, names))",
        "pixels = list(pool.map(pixels_of, r.images[::-1], names[::-1]))",
        (
            "tests/http/test_embeddings_http.py::test_images_of_one_request_decoded_in_parallel_keep_their_order_and_first_error",
        ),
        "issue 32: the decoding threads' order",
    ),
    Mutant(
        "openapi: no bearer scheme on keyed operations",
        "apis/server.py",
        'operation["security"] = [] if is_open(path) else [{"bearerAuth": []}]',
        'operation["security"] = []',
        ("tests/http/test_openapi_security.py::test_every_keyed_operation_names_the_bearer_scheme",),
        "issue 32: the published document says no key is needed",
    ),
    Mutant(
        "options: --models ignored",
        "app.py",
        "                getattr(cfg, name).enabled = False\n",
        "                pass\n",
        ("tests/http/test_server_options.py::test_lazy_loading_models_and_devices",),
        "issue 32: every configured family served",
    ),
    Mutant(
        "auth: any key accepted",
        "apis/http/middleware.py",
        'return None if match else "invalid API key"',
        "return None",
        ("tests/http/test_auth_and_errors.py::-k refused_without_a_valid_bearer_key",),
        "issue 32: --api-key checked for a header only",
    ),
    Mutant(
        "auth: header limit 8 KiB",
        "apis/http/middleware.py",
        "MAX_AUTH_HEADER = 4096",
        "MAX_AUTH_HEADER = 8192",
        ("tests/unit/test_guards.py::-k auth_header",),
        "issue 32: SECURITY.md's 4 KiB",
    ),
    Mutant(
        "auth: header limit off by one",
        "apis/http/middleware.py",
        "if len(header) > MAX_AUTH_HEADER:",
        "if len(header) >= MAX_AUTH_HEADER:",
        ("tests/unit/test_guards.py::-k auth_header",),
        "issue 32: a 4096-byte header refused",
    ),
    Mutant(
        "auth: key not trimmed",
        "apis/http/middleware.py",
        "token = token.strip()",
        "token = token",
        ("tests/unit/test_guards.py::-k auth_header",),
        "issue 32: SECURITY.md: surrounding spaces are trimmed",
    ),
    Mutant(
        "auth: two Authorization headers, the first counts",
        "apis/http/middleware.py",
        'if _count(scope, b"authorization") > 1:',
        'if _count(scope, b"authorization") > 2:',
        ("tests/http/test_hardening.py::test_two_authorization_headers_are_refused_even_if_both_are_valid",),
        "issue 32: SECURITY.md: two Authorization headers are 401",
    ),
    Mutant(
        "inputs: url on by default",
        "apis/core/settings.py",
        "    enabled: bool = False\n    allowed_hosts",
        "    enabled: bool = True\n    allowed_hosts",
        ("tests/unit/test_guards.py::-k switches",),
        "issue 32: SECURITY.md: image_url off by default",
    ),
    Mutant(
        "inputs: symlinks not resolved",
        "apis/http/inputs.py",
        "real = os.path.realpath(candidate)",
        "real = os.path.abspath(candidate)",
        ("tests/http/test_hardening.py::-k paths_outside",),
        "issue 32: SECURITY.md: a symlink that leaves the root",
    ),
    Mutant(
        "ssrf: private targets allowed",
        "apis/http/inputs.py",
        "if not (a.is_global or cfg.allow_private_networks",
        "if not (True or cfg.allow_private_networks",
        ("tests/http/test_hardening.py::-k non_public_targets",),
        "issue 32: SECURITY.md: private / loopback targets refused",
    ),
    Mutant(
        "numbers: softmax scale bound 10x",
        "apis/clip/schemas.py",
        "MAX_SCALE = 1e8",
        "MAX_SCALE = 1e9",
        ("tests/unit/test_guards.py::-k switches",),
        "issue 32: SECURITY.md's 10^8",
    ),
    Mutant(
        "numbers: mask_input bound 1.5x",
        "apis/sam2/schemas.py",
        "MASK_INPUT_LIMIT = 1e4",
        "MASK_INPUT_LIMIT = 1.5e4",
        ("tests/unit/test_guards.py::-k switches",),
        "issue 32: SECURITY.md's 10^4 (the old test tried 2e4 only)",
    ),
    Mutant(
        "clients: sam2 video checkpoint_path dropped",
        "clients/sam2_client.py",
        'selector={"model_cfg": model_cfg, "checkpoint_path": checkpoint_path},',
        'selector={"model_cfg": model_cfg},',
        ("tests/http/test_openapi_answers.py::-k video_session_clients",),
        "issue 32: a session field the client cannot send (the gap this test found)",
    ),
    Mutant(
        "clients: video propagate default both",
        "clients/video.py",
        'self, direction: str = "forward",',
        'self, direction: str = "both",',
        ("tests/http/test_openapi_answers.py::-k video_session_clients",),
        "issue 32: a video client default off the server's",
    ),
    Mutant(
        "clients: sam2 video clear_old_points default false",
        "clients/sam2_client.py",
        "clear_old_points: bool = True,",
        "clear_old_points: bool = False,",
        ("tests/http/test_openapi_answers.py::-k video_session_clients",),
        "issue 32: a video client default off the server's",
    ),
    Mutant(
        "video: max_frames one over",
        "apis/core/video.py",
        "if len(frames) == max_frames:",
        "if len(frames) == max_frames + 1:",
        ("tests/unit/test_sam2_video.py::test_decode_video_reads_mp4_and_enforces_limits",),
        "issue 32: video.max_frames by its number",
    ),
    Mutant(
        "video: bbox one pixel short",
        "apis/core/video.py",
        "int(cols[-1] - cols[0]) + 1, int(rows[-1] - rows[0]) + 1]",
        "int(cols[-1] - cols[0]), int(rows[-1] - rows[0])]",
        ("tests/unit/test_sam2_video.py::test_mask_encodings_decode_to_the_same_pixels",),
        "issue 32: bbox against pycocotools' toBbox",
    ),
    Mutant(
        "video: png masks answered as RLE",
        "apis/core/video.py",
        '    if encoding == "png":\n        return png_base64(mask)',
        '    if encoding == "png":\n        return coco_rle(mask)',
        ("tests/unit/test_sam2_video.py::test_mask_encodings_decode_to_the_same_pixels",),
        "issue 32: mask_encoding png ignored",
    ),
    Mutant(
        "sessions: a lost session answered 404",
        "apis/core/sessions.py",
        '        410,\n        f"video session {session_id!r} is gone',
        '        404,\n        f"video session {session_id!r} is gone',
        ("tests/http/test_sam2_video_http.py::test_a_session_whose_worker_died_is_lost",),
        "issue 32: a killed worker's sessions are 410",
    ),
    Mutant(
        "sessions: total memory left out",
        "apis/core/sessions.py",
        '"memory_bytes": sum(s["memory_bytes"] or 0 for s in sessions),',
        '"memory_bytes": 0,',
        ("tests/http/test_sam2_video_http.py::test_memory_per_session_in_info_and_metrics",),
        "issue 32: memory in /info and /metrics",
    ),
    Mutant(
        "dispatch: a left stream not withdrawn",
        "apis/transport/dispatch.py",
        "            if not parts.ended and link in self._links:\n                link.send(Withdraw(uid))",
        "            pass",
        (
            "tests/unit/test_dispatch.py::test_streams_interleave_take_new_requests_between_parts_and_stop_when_withdrawn",
        ),
        "issue 32: a client that leaves a stream: the worker runs on",
    ),
    Mutant(
        "playground: CSP allows every origin",
        "apis/http/playground.py",
        '"Content-Security-Policy": "default-src \'self\';',
        '"Content-Security-Policy": "default-src *;',
        ("tests/e2e/test_playground.py::test_the_page_is_open_and_loads_nothing_from_elsewhere",),
        "issue 32: the playground may load from elsewhere",
    ),
    Mutant(
        "options: --host always loopback",
        "app.py",
        "    host = text.strip()\n",
        "    host = '127.0.0.1'\n",
        ("tests/e2e/test_deploy.py::test_host_takes_any_address_or_host_name",),
        "issue 32: --host accepted and ignored",
    ),
    Mutant(
        "folders: the journal ignored on a second run",
        "clients/folders.py",
        "todo = [f for f in files if f.relative_to(root).as_posix() not in journal.records]",
        "todo = list(files)",
        ("tests/http/test_folder_commands.py::test_dino_embed_resumes",),
        "issue 32: a resumed run redoes every image",
    ),
    Mutant(
        "auth: --no-auth logged as info",
        "app.py",
        'log.warning("AUTH DISABLED',
        'log.info("AUTH DISABLED',
        ("tests/http/test_off_states.py::-k no_auth",),
        "issue 32: SECURITY.md: --no-auth is logged as a warning",
    ),
    Mutant(
        "body: chunked bodies not counted",
        "apis/http/middleware.py",
        "if seen > self.max_bytes:",
        "if False:",
        ("tests/http/test_hardening.py::test_a_chunked_body_is_cut_at_the_limit",),
        "issue 32: SECURITY.md: chunked bodies are counted while they stream and cut at the limit",
    ),
    Mutant(
        "sam3 video: refining points with x and y scaled by the wrong side",
        "apis/sam3/video.py",
        "coords /= torch.tensor([self.width, self.height], dtype=torch.float32)",
        "coords /= torch.tensor([self.height, self.width], dtype=torch.float32)",
        ("tests/unit/test_sam3_video.py::test_text_prompt_then_points_match_the_library",),
        "issue 32: points refinements (pixels to the library's normalised units)",
    ),
    Mutant(
        "health: total_model_instances counts workers",
        "apis/family_http.py",
        '"total_model_instances": sum(len(w["models_loaded"]) for w in snaps),',
        '"total_model_instances": len(snaps),',
        ("tests/http/test_family_health.py::-k seed_004",),
        "issue 32: /<family>/health's model copies (DINO's demo worker holds two models)",
    ),
    Mutant(
        "playground: a family not configured (404) shown",
        "apis/http/playground/app.js",
        "if (resp.status === 404) return false;",
        "if (resp.status === 404) return true;",
        ("tests/e2e/test_playground.py::test_panels_of_families_not_served_are_hidden",),
        "issue 32: the panels of families the server does not serve are hidden",
    ),
    Mutant(
        "weights hub: sam2's downloaded checkpoint not loaded",
        "apis/sam2/model.py",
        "model = build_sam2_video_predictor(config, checkpoint, **build)",
        "model = build_sam2_video_predictor(config, None, **build)",
        ("tests/http/test_weights_hub.py::test_download_then_serve_offline",),
        "issue 32: a family serving its random initialisation instead of the files the hub served",
    ),
    Mutant(
        "sam2 live: add_frame forgets one frame too many",
        "apis/sam2/video.py",
        "self._forget(index + 1)",
        "self._forget(index + 2)",
        ("tests/http/test_sam2_video_http.py::test_live_frames_equal_offline_propagation",),
        "issue 32: live sessions over HTTP: the newest frame and the memory it needs kept",
    ),
    Mutant(
        "worker loop: a stream runs to its end before the next request",
        "apis/transport/worker_loop.py",
        "                part = next_part(lit_api, streams[uid])\n                if not part.more:",
        "                part = next_part(lit_api, streams[uid])\n"
        "                while part.more:\n"
        "                    link.answer(uid, part)\n"
        "                    part = next_part(lit_api, streams[uid])\n"
        "                if not part.more:",
        ("tests/http/test_sam2_video_http.py::test_streams_interleave_and_sessions_stay_on_their_worker",),
        "issue 32: two sessions' streams interleave on one worker, answered between parts",
    ),
    Mutant(
        "video: an MP4 clip's first frame dropped",
        "apis/video_sessions.py",
        "frames = video.decode_video(r.video, r.max_frames, limits.max_image_pixels)",
        "frames = video.decode_video(r.video, r.max_frames, limits.max_image_pixels)[1:]",
        ("tests/http/test_sam2_video_http.py::test_an_mp4_clip_is_decoded_in_the_worker",),
        "issue 32: an MP4 sent as `video` becomes the session's frames, every one",
    ),
    Mutant(
        "sam3 video: exemplar boxes sent as x1 y1 x2 y2",
        "apis/sam3/video.py",
        "out.append([x1 / self.width, y1 / self.height, (x2 - x1) / self.width, (y2 - y1) / self.height])",
        "out.append([x1 / self.width, y1 / self.height, x2 / self.width, y2 / self.height])",
        ("tests/http/test_sam3_video_http.py::test_prompt_propagated_equals_the_library[box]",),
        "issue 32: a box prompt over HTTP: pixels [x1, y1, x2, y2] to sam3's normalised [x, y, w, h]",
    ),
    Mutant(
        "frames route: live frames in BGR",
        "apis/video_sessions.py",
        "result = entry.session.add_frame(_rgb(job.image))",
        "result = entry.session.add_frame(_rgb(job.image)[..., ::-1])",
        (
            "tests/http/test_sam3_video_http.py::test_live_session_answers_each_frame_as_the_session_in_process",
        ),
        "issue 32: SAM 3 live sessions over HTTP: /frames answers as the session in process",
    ),
    Mutant(
        "sam3 video: propagating before a prompt not refused",
        "apis/sam3/video.py",
        'if not internals.prompted(state):\n            raise APIError(400, "add a prompt',
        'if False:\n            raise APIError(400, "add a prompt',
        ("tests/http/test_sam3_video_http.py::test_bad_prompts_and_limits_get_their_4xx",),
        "issue 32: SAM 3 session calls out of order get their 4xx",
    ),
    Mutant(
        "clients: video session frames sent in reverse order",
        "clients/video.py",
        '"frames": None if frames is None else [encode_image(f) for f in frames],',
        '"frames": None if frames is None else [encode_image(f) for f in frames[::-1]],',
        ("tests/http/test_sam3_video_http.py::test_client_session_and_track_command",),
        "issue 32: Sam3VideoSession on frames tracks them in their order",
    ),
    Mutant(
        "clients: closing a lost video session raises",
        "clients/video.py",
        "if e.status not in (404, 410):",
        "if e.status not in (404,):",
        ("tests/http/test_sam3_video_http.py::test_a_session_whose_worker_died_is_lost",),
        "issue 32: a session lost with its worker (410) closes without error",
    ),
    Mutant(
        "workers: no module blocked",
        "apis/core/process.py",
        "            sys.modules[name] = None  # type: ignore[assignment]",
        "            pass",
        (
            "tests/http/test_http_process.py::test_only_the_sam3_worker_loads_triton_and_cpu_workers_no_cuda_bindings",
        ),
        "issue 36: triton stays out of the workers but SAM 3's, NVIDIA's CUDA bindings out of CPU workers",
    ),
]


def copy_tree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree (no venv, no caches)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file() and not src.is_symlink():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())


def run(m: Mutant, timeout: float) -> tuple[str, float, str]:
    """'killed' (the tests failed), 'survived' (they passed) or 'error: ...' (they could not run)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        path = work / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            return f"error: snippet found {text.count(m.old)} times in {m.file}", 0.0, ""
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.monotonic()
        # -n 0: in one process, where -x stops with exit 1 (under xdist it is 2, "interrupted")
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider"]
        keywords = []
        for test in m.tests:  # "file::-k words" selects by keyword (pytest takes one -k: or-ed)
            path, _, words = test.partition("::-k ")
            cmd.append(path if words else test)
            keywords += [f"({words})"] if words else []
        cmd += ["-k", " or ".join(keywords)] if keywords else []
        try:
            p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "error: timed out", time.monotonic() - t0, ""
        took = time.monotonic() - t0
        tail = "\n".join(p.stdout.strip().splitlines()[-3:])
        if p.returncode == 1:
            return "killed", took, tail
        if p.returncode == 0:
            return "survived", took, tail
        return f"error: pytest exit {p.returncode}", took, tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("words", nargs="*", help="run only mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("-v", "--verbose", action="store_true", help="print the tail of each pytest run")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.why}\n    " + "\n    ".join(m.tests))
        return 0
    print("| mutant | tests | result | s |\n|---|---|---|---|", flush=True)
    bad = 0
    for m in chosen:
        result, took, tail = run(m, args.timeout)
        bad += result != "killed"
        names = ", ".join(t.split("::")[-1] for t in m.tests)
        print(f"| {m.name} | {names} | {result} | {took:.0f} |", flush=True)
        if args.verbose or result != "killed":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
