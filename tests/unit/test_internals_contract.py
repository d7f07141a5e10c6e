"""The releases whose internals the server was checked against: uvicorn, FastAPI, pydantic, sam2,
sam3 and open_clip, each library's in one module (apis/uvicorn_internals.py,
apis/fastapi_internals.py, apis/pydantic_internals.py, apis/sam2/internals.py,
apis/sam3/internals.py, apis/open_clip_internals.py; LitServe's: tests/unit/test_litserve_contract.py).

Another release may rename or change them without an error at import time, so these tests fail
until someone has read the named module against the new release and updated its version constant
and the pin in pyproject.toml (and requirements/, `python scripts/lock.py`); the others check that
each private name and state key used is still there with the arguments passed to it.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from apis import fastapi_internals, pydantic_internals, uvicorn_internals
from apis.fastapi_internals import FASTAPI_VERSION, body_model
from apis.http.routing import JsonBodyRoute
from apis.pydantic_internals import PYDANTIC_VERSION, replace_fields
from apis.uvicorn_internals import UVICORN_VERSION, GuardedHttpToolsProtocol


def _read_again(package: str, module, constant: str, checked: str) -> str:
    return (
        f"{package} {version(package)} is installed, but {module.__file__} was checked against "
        f"{package} {checked}: read it against the new release, then update {constant}, the pin in "
        "pyproject.toml and requirements/ (python scripts/lock.py)"
    )


# ----------------------------------------------------------------------------- uvicorn


def test_the_installed_uvicorn_is_the_release_the_protocol_was_checked_against():
    assert version("uvicorn") == UVICORN_VERSION, _read_again(
        "uvicorn", uvicorn_internals, "UVICORN_VERSION", UVICORN_VERSION
    )


def test_every_overridden_protocol_method_still_exists_with_its_signature():
    ours = {name for name, value in vars(GuardedHttpToolsProtocol).items() if inspect.isfunction(value)}
    ours -= {"_too_large_head", "_refuse"}
    for name in sorted(ours):
        assert hasattr(HttpToolsProtocol, name), f"uvicorn's HttpToolsProtocol no longer has {name}"
        want = list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters)
        got = list(inspect.signature(getattr(GuardedHttpToolsProtocol, name)).parameters)
        assert got == want or name == "__init__", (
            f"{name}{want} in uvicorn, {name}{got} in {uvicorn_internals.__file__}"
        )


# ----------------------------------------------------------------------------- FastAPI


def test_the_installed_fastapi_is_the_release_the_route_class_was_checked_against():
    assert version("fastapi") == FASTAPI_VERSION, _read_again(
        "fastapi", fastapi_internals, "FASTAPI_VERSION", FASTAPI_VERSION
    )


class Body(BaseModel):
    text: str


def test_a_routes_body_field_still_names_the_request_model():
    async def endpoint(body: Body) -> dict:
        return {}

    async def no_body() -> dict:
        return {}

    route = JsonBodyRoute("/x", endpoint, methods=["POST"])
    assert isinstance(route, APIRoute) and route.endpoint is endpoint
    assert body_model(route) is Body
    assert body_model(APIRoute("/y", no_body, methods=["GET"])) is None
    assert callable(route.get_route_handler())


# ----------------------------------------------------------------------------- pydantic


def test_the_installed_pydantic_is_the_minor_release_the_field_writes_were_checked_against():
    installed = ".".join(version("pydantic").split(".")[:2])
    assert installed == PYDANTIC_VERSION, _read_again(
        "pydantic", pydantic_internals, "PYDANTIC_VERSION", PYDANTIC_VERSION
    )


def test_a_replaced_field_is_validated_and_shown_in_the_schema():
    class Model(BaseModel):
        n: int = Field(3, ge=0)

    wider = FieldInfo.merge_field_infos(Model.model_fields["n"])
    wider.annotation = int | None
    replace_fields(Model, {"n": wider})
    assert Model.model_fields["n"] is wider
    assert Model.model_validate({"n": None}).n is None
    assert Model.model_validate({}).n == 3
    with pytest.raises(ValueError):
        Model.model_validate({"n": -1})  # the field's constraint kept
    assert {"type": "null"} in Model.model_json_schema()["properties"]["n"]["anyOf"]


# ----------------------------------------------------------------------------- sam2


def test_the_installed_sam2_is_the_release_the_internals_were_checked_against():
    from apis.sam2 import internals

    assert version("sam2") == internals.SAM2_VERSION, _read_again(
        "sam2", internals, "SAM2_VERSION", internals.SAM2_VERSION
    )


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_sam2_private_functions_take_the_arguments_passed_to_them():
    import sam2.sam2_video_predictor
    import sam2.utils.misc
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import _hf_download
    from sam2.modeling.memory_attention import MemoryAttention
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam2.utils.transforms import SAM2Transforms

    assert _parameters(_hf_download) == ["model_id"]
    assert _parameters(SAM2ImagePredictor._prep_prompts)[:7] == [
        "self", "point_coords", "point_labels", "box", "mask_logits", "normalize_coords", "img_idx"
    ]  # fmt: skip
    assert _parameters(SAM2Transforms.postprocess_masks) == ["self", "masks", "orig_hw"]
    transforms = SAM2Transforms(resolution=64, mask_threshold=0.0)
    assert {"mask_threshold", "max_hole_area", "max_sprinkle_area"} <= set(vars(transforms))
    assert _parameters(SAM2AutomaticMaskGenerator._process_crop)[1:] == [
        "image", "crop_box", "crop_layer_idx", "orig_size"
    ]  # fmt: skip
    assert "_process_batch" in vars(SAM2AutomaticMaskGenerator)
    assert {"memory", "memory_pos"} <= set(_parameters(MemoryAttention.forward))
    assert callable(sam2.utils.misc.get_connected_components)
    assert "tqdm(" in inspect.getsource(sam2.sam2_video_predictor)  # the bar silenced


def test_the_mask_decoder_still_runs_the_steps_the_prompt_decoder_repeats():
    """internals.PromptDecoder runs sam2's mask decoder step by step (its first layer's image
    projections given): these are the steps of sam2 1.1.0 it repeats. Its answers are checked
    against SAM2ImagePredictor in tests/http/test_sam2_http.py."""
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

    steps = {
        MaskDecoder.predict_masks: [
            "src = src + dense_prompt_embeddings",
            "hs, src = self.transformer(src, pos_src, tokens)",
            "upscaled_embedding = act1(ln1(dc1(src) + feat_s1))",
            "upscaled_embedding = act2(dc2(upscaled_embedding) + feat_s0)",
            "iou_pred = self.iou_prediction_head(iou_token_out)",
        ],
        MaskDecoder.forward: [
            "masks = masks[:, 1:, :, :]",
            "self._dynamic_multimask_via_stability(masks, iou_pred)",
        ],
        TwoWayAttentionBlock.forward: [
            "queries = self.self_attn(q=queries, k=queries, v=queries)",
            "attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)",
            "attn_out = self.cross_attn_image_to_token(q=k, k=q, v=queries)",
        ],
        TwoWayTransformer.forward: ["attn_out = self.final_attn_token_to_image(q=q, k=k, v=keys)"],
        Attention.forward: ["out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)"],
    }
    for fn, lines in steps.items():
        source = inspect.getsource(fn)
        for line in lines:
            assert line in source, f"{fn.__qualname__} no longer runs {line!r}"
    assert {"_separate_heads", "_recombine_heads"} <= set(vars(Attention))


def test_the_image_predictor_still_keeps_the_state_that_is_written():
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    source = inspect.getsource(SAM2ImagePredictor)
    for name in ("_bb_feat_sizes", "_features", "_orig_hw", "_is_image_set", "_is_batch", "_transforms"):
        assert f"self.{name}" in source, f"SAM2ImagePredictor no longer keeps {name}"
    assert 'self._features["image_embed"]' in source and 'self._features["high_res_feats"]' in source
    # a batch's features are read per image by index (internals.use_batch_features hands it lists)
    assert 'self._features["image_embed"][img_idx]' in source and "feat_level[img_idx]" in source
    assert "self._orig_hw[img_idx]" in source


def test_the_inference_state_has_the_keys_init_state_makes():
    import torch
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from apis.sam2 import internals

    ours = set(internals.new_inference_state([], 1, (2, 3), torch.device("cpu"), False, False))
    source = inspect.getsource(SAM2VideoPredictor.init_state)
    theirs = set(re.findall(r'inference_state\["(\w+)"\] =', source))
    assert ours == theirs, f"init_state makes {sorted(theirs - ours)}; we make {sorted(ours - theirs)}"
    read = inspect.getsource(SAM2VideoPredictor)
    for key in ("cond_frame_outputs", "non_cond_frame_outputs", "object_score_logits"):
        assert f'"{key}"' in read, f"SAM2VideoPredictor no longer writes {key}"


# ----------------------------------------------------------------------------- sam3


def test_the_installed_sam3_is_the_release_the_internals_were_checked_against():
    from apis.sam3 import internals

    assert version("sam3") == internals.SAM3_VERSION, _read_again(
        "sam3", internals, "SAM3_VERSION", internals.SAM3_VERSION
    )


def test_the_sam3_private_functions_take_the_arguments_passed_to_them():
    from sam3.model import sam3_video_inference
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image, Sam3ImageOnVideoMultiGPU
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
    from sam3.model.sam3_video_inference import Sam3VideoInference
    from sam3.model.text_encoder_ve import TextTransformer
    from sam3.model.vl_combiner import SAM3VLBackbone
    from sam3.perflib import connected_components

    assert "precompute_resolution" in _parameters(PositionEmbeddingSine.__init__)
    assert _parameters(TransformerDecoder._get_coords) == ["H", "W", "device"]
    assert {"frame_idx_begin", "frame_idx_end", "multigpu_buffer"} <= set(
        _parameters(Sam3ImageOnVideoMultiGPU._build_multigpu_buffer_next_chunk)
    )
    assert _parameters(Sam3Image._get_dummy_prompt) == ["self", "num_prompts"]
    assert _parameters(Sam3VideoInference._get_processing_order) == [
        "self", "inference_state", "start_frame_idx", "max_frame_num_to_track", "reverse"
    ]  # fmt: skip
    assert _parameters(Sam3VideoInference.propagate_in_video)[:4] == [
        "self", "inference_state", "start_frame_idx", "max_frame_num_to_track"
    ]  # fmt: skip
    assert _parameters(SAM3VLBackbone.forward_text) == [
        "self",
        "captions",
        "input_boxes",
        "additional_text",
        "device",
    ]
    assert _parameters(SAM3VLBackbone.forward_image) == ["self", "samples"]
    assert callable(connected_components.connected_components_cpu)
    assert "tqdm(" in inspect.getsource(sam3_video_inference)  # the bar silenced
    source = inspect.getsource(Sam3TrackerPredictor.init_state)
    assert '"offload_state_to_cpu"' in source and '"storage_device"' in source
    neck = inspect.getsource(Sam3DualViTDetNeck)
    assert "self.convs" in neck and "self.sam2_convs" in neck and "add_sam2_neck" in neck
    text = inspect.getsource(TextTransformer)
    assert "self.positional_embedding" in text and "self.text_projection" in text
    for name in ("cache", "compilable_cord_cache", "coord_cache"):
        assert f"self.{name}" in inspect.getsource(PositionEmbeddingSine) + inspect.getsource(
            TransformerDecoder
        )


def test_the_sam3_video_state_has_the_keys_read_and_grown():
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
    from sam3.model.sam3_video_inference import Sam3VideoInference

    from apis.sam3 import internals

    made = inspect.getsource(Sam3VideoInference.init_state) + inspect.getsource(
        Sam3VideoInference._construct_initial_input_batch
    )
    keys = set(re.findall(r'inference_state\["(\w+)"\] =', made))
    used = {"num_frames", "orig_height", "orig_width", "tracker_inference_states", "cached_frame_outputs"}
    used |= {"input_batch", "per_frame_cur_step", *internals.PER_FRAME_INPUTS}
    assert used <= keys, f"init_state no longer makes {sorted(used - keys)}"
    for field in ("img_batch", "find_inputs", "find_targets", "find_metadatas"):
        assert f"{field}=" in made, f"sam3's input batch no longer has {field}"
    assert 'inference_state["num_frames"] =' in inspect.getsource(Sam3TrackerPredictor.init_state)


# ----------------------------------------------------------------------------- open_clip


def test_the_installed_open_clip_is_the_release_the_internals_were_checked_against():
    from apis import open_clip_internals

    assert version("open_clip_torch") == open_clip_internals.OPEN_CLIP_VERSION, _read_again(
        "open_clip_torch", open_clip_internals, "OPEN_CLIP_VERSION", open_clip_internals.OPEN_CLIP_VERSION
    )


def test_the_open_clip_internals_take_the_arguments_passed_to_them():
    import torch
    from open_clip.pretrained import download_pretrained_from_hf
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip.transformer import ResidualAttentionBlock, text_global_pool

    from apis import open_clip_internals

    assert _parameters(text_global_pool) == ["x", "text", "pool_type", "eos_token_id"]
    assert _parameters(image_transform_v2)[:2] == ["cfg", "is_train"]
    assert {"size", "mode", "mean", "std", "interpolation", "resize_mode"} <= set(vars(PreprocessCfg()))
    assert _parameters(download_pretrained_from_hf)[0] == "model_id"
    assert open_clip_internals.bpe_vocabulary().endswith("bpe_simple_vocab_16e6.txt.gz")
    plain = torch.nn.ModuleList([ResidualAttentionBlock(8, 2)])
    assert plain[0].attn._qkv_same_embed_dim and open_clip_internals.standard_blocks(plain)
    assert not open_clip_internals.standard_blocks(
        torch.nn.ModuleList([ResidualAttentionBlock(8, 2, is_cross_attention=True)])
    )
