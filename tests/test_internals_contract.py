"""The releases whose internals the server was checked against: uvicorn, FastAPI, pydantic and
sam2, each library's in one module (apis/uvicorn_internals.py, apis/fastapi_internals.py,
apis/pydantic_internals.py, apis/sam2/internals.py; LitServe's: tests/test_litserve_contract.py).

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
    assert _parameters(SAM2ImagePredictor._predict)[:8] == [
        "self", "point_coords", "point_labels", "boxes", "mask_input", "multimask_output", "return_logits",
        "img_idx",
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
