"""Every contact with sam2's internals, checked against sam2 1.1.0 (the pin in pyproject.toml).

sam2 has public entry points for what this server does on whole requests (``set_image``,
``predict``, ``generate``, ``init_state``, ``add_new_points_or_box``, ``propagate_in_video``),
and apis/sam2/model.py and video.py use those. What they have no public API for is here:

* the image predictor's state and steps: its feature sizes, the current image's features
  (set from the cache), post-processing settings, the prompt preparation (``_prep_prompts``)
  and the mask upsampling (``_transforms.postprocess_masks``);
* the mask decoder's steps (``MaskDecoder.predict_masks``, ``TwoWayTransformer.forward`` and
  its first layer's attention modules), run by :class:`PromptDecoder` with the image's share
  computed once;
* the automatic generator's per-crop and per-point-batch steps (``_process_crop``,
  ``_process_batch``);
* the hub download (``build_sam._hf_download``) and the compiled extension (``sam2._C``);
* the video predictor's inference state: its keys, written by :func:`new_inference_state`
  instead of ``init_state``'s file loader, and read by the functions below;
* module attributes replaced: the progress bar and the connected-components kernel; a
  pre-hook on memory attention's ``memory``/``memory_pos`` arguments.

tests/unit/test_internals_contract.py fails on another release and checks each name used here.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sam2.sam2_video_predictor
import sam2.utils.misc
import torch
import torch.nn.functional as F
from sam2.build_sam import _hf_download

from apis.core import withdrawal

if TYPE_CHECKING:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.sam2_image_predictor import SAM2ImagePredictor

# sam2's image predictor and generator are imported when first used, not here: apis/sam2/video.py
# imports this module, and a lazy module (apis/core/lazy.py) may be loaded while torchvision,
# under sam2.sam2_image_predictor, is still being imported.

SAM2_VERSION = "1.1.0"


def hf_download(repo: str) -> str:
    """The checkpoint of a released variant, by sam2's own hub download."""
    return _hf_download(repo)[1]


# ----------------------------------------------------------------------------- image predictor


def set_feature_sizes(pred: SAM2ImagePredictor, image_size: int) -> None:
    """The library hard-codes the backbone's feature sizes of 1024-px models."""
    s = image_size
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]


def features(pred: SAM2ImagePredictor) -> dict[str, Any]:
    """What ``set_image``/``set_image_batch`` computed: ``image_embed`` and ``high_res_feats``."""
    return pred._features


def use_features(
    pred: SAM2ImagePredictor,
    image_embed: torch.Tensor,
    high_res_feats: list[torch.Tensor],
    orig_hw: tuple[int, int],
) -> None:
    """Make these the current image's features, as if ``set_image`` had just computed them."""
    pred.reset_predictor()
    pred._features = {"image_embed": image_embed, "high_res_feats": high_res_feats}
    pred._orig_hw = [orig_hw]
    pred._is_image_set = True
    pred._is_batch = False


def use_batch_features(
    pred: SAM2ImagePredictor,
    image_embeds: list[torch.Tensor],
    high_res_feats: list[list[torch.Tensor]],
    orig_hws: list[tuple[int, int]],
) -> None:
    """Make these images the current batch, as ``set_image_batch`` would, without stacking their
    features: ``_predict`` and ``_prep_prompts`` index them by ``img_idx`` (lists index as its
    tensors do), so an image's (1, C, h, w) cached tensors are read, not copied."""
    pred.reset_predictor()
    levels = range(len(high_res_feats[0]))
    pred._features = {
        "image_embed": [e[0] for e in image_embeds],
        "high_res_feats": [[f[level][0] for f in high_res_feats] for level in levels],
    }
    pred._orig_hw = list(orig_hws)
    pred._is_image_set = True
    pred._is_batch = True


def set_postprocessing(
    pred: SAM2ImagePredictor, mask_threshold: float, max_hole_area: float, max_sprinkle_area: float
) -> None:
    """Post-processing settings for the next prediction (the library fixes them at construction)."""
    pred.mask_threshold = mask_threshold
    pred._transforms.mask_threshold = mask_threshold
    pred._transforms.max_hole_area = max_hole_area
    pred._transforms.max_sprinkle_area = max_sprinkle_area


def prep_prompts(
    pred: SAM2ImagePredictor, points, labels, box, mask_input, normalize_coords: bool, img_idx: int = -1
):
    """``predict``'s prompt preparation for image ``img_idx`` of the current batch (-1: the current
    image): (mask_input, coords, labels, box) as tensors."""
    return pred._prep_prompts(points, labels, box, mask_input, normalize_coords, img_idx)


class PromptDecoder(torch.nn.Module):
    """The model steps of ``SAM2ImagePredictor._predict`` (prompt encoder, mask decoder, the clamp
    of the low-res logits) for one prompt of one kind, the image's features given as inputs, so
    that torch.jit can trace it.

    The mask decoder's work that depends on the image alone is taken as inputs too: its first
    layer projects the 4,096 image tokens for both cross-attentions (keys and values of the
    tokens' attention to the image, queries of the image's to the tokens) before any prompt
    token reaches them, about a fifth of a click's FLOPs (:meth:`image_side`, computed once per
    image). A mask input changes those tokens, so that kind computes them itself.

    ``forward(image_embed, feat_s0, feat_s1, [k, v, q], [coords, labels], [box], [mask_input])``
    with the tensors :func:`prep_prompts` gives, those the kind has. The steps are
    ``MaskDecoder.forward``, ``predict_masks`` and ``TwoWayTransformer.forward`` of sam2 1.1.0,
    in the same order on the same modules, so the answers equal ``_predict``'s.
    """

    def __init__(self, model: torch.nn.Module, points: bool, box: bool, mask: bool, multimask: bool):
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        self.points, self.box, self.mask, self.multimask = points, box, mask, multimask
        assert self.mask_decoder.use_high_res_features, "sam2's image predictor always passes them"
        assert self.mask_decoder.transformer.layers[0].skip_first_layer_pe, "as TwoWayTransformer builds it"

    def image_tokens(
        self, image_embed: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's image tokens and their positional encoding, (1, HW, C) each."""
        keys = (image_embed + dense).flatten(2).permute(0, 2, 1)
        return keys, self.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)

    def image_side(self, image_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first layer's projections of an image's tokens with no mask input: (k, v, q)."""
        keys, pe = self.image_tokens(image_embed, self.no_mask(image_embed))
        return self._projected(keys, pe)

    def no_mask(self, image_embed: torch.Tensor) -> torch.Tensor:
        """The dense prompt embedding of a prompt without a mask input."""
        _, c, h, w = image_embed.shape
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, c, h, w)

    def _projected(
        self, keys: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = self.mask_decoder.transformer.layers[0]
        with_pe = keys + pe
        return (
            first.cross_attn_token_to_image.k_proj(with_pe),
            first.cross_attn_token_to_image.v_proj(keys),
            first.cross_attn_image_to_token.q_proj(with_pe),
        )

    def forward(self, image_embed, feat_s0, feat_s1, *inputs):
        given = iter(inputs)
        side = None if self.mask else (next(given), next(given), next(given))
        points = (next(given), next(given)) if self.points else None
        if self.box:  # the box's corners go first, labelled 2 and 3, as _predict does
            corners = next(given).reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=corners.device).repeat(corners.size(0), 1)
            if points is None:
                points = (corners, labels)
            else:
                points = (torch.cat([corners, points[0]], dim=1), torch.cat([labels, points[1]], dim=1))
        mask_input = next(given) if self.mask else None
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=mask_input)
        keys, pe = self.image_tokens(image_embed, dense)
        if side is None:
            side = self._projected(keys, pe)
        md = self.mask_decoder
        s = 1 if md.pred_obj_scores else 0
        first_tokens = [md.obj_score_token.weight] if md.pred_obj_scores else []
        output_tokens = torch.cat([*first_tokens, md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        queries, keys = self._transformer(tokens, keys, pe, side)
        b, c, h, w = image_embed.shape
        src = keys.transpose(1, 2).view(b, c, h, w)
        dc1, ln1, act1, dc2, act2 = md.output_upscaling
        upscaled = act1(ln1(dc1(src) + feat_s1))
        upscaled = act2(dc2(upscaled) + feat_s0)
        mask_tokens = queries[:, s + 1 : s + 1 + md.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        logits = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou = md.iou_prediction_head(queries[:, s, :])
        if self.multimask:
            logits, iou = logits[:, 1:], iou[:, 1:]
        elif md.dynamic_multimask_via_stability:
            logits, iou = md._dynamic_multimask_via_stability(logits, iou)
        else:
            logits, iou = logits[:, 0:1], iou[:, 0:1]
        return logits, iou, torch.clamp(logits, -32.0, 32.0)

    def _transformer(self, tokens, keys, pe, side):
        """``TwoWayTransformer.forward`` with its first layer's image projections given."""
        t = self.mask_decoder.transformer
        first, *rest = t.layers
        k0, v0, q0 = side
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))  # its first layer skips the PE
        to_image = first.cross_attn_token_to_image
        queries = first.norm2(queries + _attend(to_image, to_image.q_proj(queries + tokens), k0, v0))
        queries = first.norm3(queries + first.mlp(queries))
        to_token = first.cross_attn_image_to_token
        q = queries + tokens
        keys = first.norm4(keys + _attend(to_token, q0, to_token.k_proj(q), to_token.v_proj(queries)))
        for layer in rest:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=pe)
        attn_out = t.final_attn_token_to_image(q=queries + tokens, k=keys + pe, v=keys)
        return t.norm_final_attn(queries + attn_out), keys


def _attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sam2's ``Attention.forward`` after its input projections (``q``, ``k``, ``v`` projected)."""
    heads = attn.num_heads
    out = F.scaled_dot_product_attention(
        attn._separate_heads(q, heads), attn._separate_heads(k, heads), attn._separate_heads(v, heads)
    )
    return attn.out_proj(attn._recombine_heads(out))


def traced_decoder(decoder: PromptDecoder, example: tuple) -> Any:
    """``decoder`` traced on ``example`` (its inputs): its ops run without Python between them.
    Not frozen: a frozen graph holds its own copy of the decoder's weights (14 MB per kind of
    prompt for hiera_l) and ran no faster here (36.6 vs 36.7 ms a click on two threads)."""
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on sam2's shape asserts and the box labels, constants for one kind;
        # torch 2.14 calls torch.jit deprecated, which trace_decoder's description says
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(decoder.eval(), example, check_trace=False)


def postprocess_masks(
    pred: SAM2ImagePredictor, logits: torch.Tensor, orig_hw: tuple[int, int]
) -> torch.Tensor:
    """The library's upsampling to the image's size, with its hole and sprinkle filling."""
    return pred._transforms.postprocess_masks(logits, orig_hw)


def mask_generator(model: torch.nn.Module, **settings: Any) -> SAM2AutomaticMaskGenerator:
    """The library's generator, counting the masks its crops keep (``kept``), and stopping
    between point batches when the request was withdrawn."""
    return _generator_class()(model, **settings)


@functools.cache
def _generator_class() -> type[SAM2AutomaticMaskGenerator]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    class Generator(SAM2AutomaticMaskGenerator):
        kept = 0

        def _process_crop(self, *args, **kwargs):
            data = super()._process_crop(*args, **kwargs)
            self.kept += len(data["rles"])
            return data

        def _process_batch(self, *args, **kwargs):
            withdrawal.check()  # a point batch is the chunk: stop here if the client left
            return super()._process_batch(*args, **kwargs)

    return Generator


# ----------------------------------------------------------------------------- module attributes


def _cuda_kernel_available() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def route_connected_components(cpu: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Route sam2's connected-components calls to ``cpu`` unless the CUDA kernel is built and
    the mask is on a GPU. Idempotent."""
    current = sam2.utils.misc.get_connected_components
    if getattr(current, "visionserve", False):
        return
    cuda_kernel = current if _cuda_kernel_available() else None

    def dispatch(mask: torch.Tensor):
        if cuda_kernel is not None and mask.is_cuda:
            return cuda_kernel(mask)
        return cpu(mask)

    dispatch.visionserve = True
    sam2.utils.misc.get_connected_components = dispatch


def silence_progress_bars() -> None:
    """The library draws a tqdm bar per propagation: one per live frame in a server's log."""
    sam2.sam2_video_predictor.tqdm = lambda iterable, **_: iterable


def _memory_as_positions(_module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Memory attention pre-hook: the library stores memories in bfloat16 and relies on a
    float32 object pointer in the same ``torch.cat`` to promote them; a frame before an
    object's first prompt has no pointer and a float32 model then fails (CPU). Casting to the
    positions' dtype is what that promotion gives, so no other answer changes."""
    memory, pos = kwargs.get("memory"), kwargs.get("memory_pos")
    if memory is not None and pos is not None and memory.dtype != pos.dtype:
        kwargs["memory"] = memory.to(pos.dtype)
    return args, kwargs


def install_memory_dtype_fix(predictor: torch.nn.Module) -> None:
    """Add :func:`_memory_as_positions` to the model once."""
    attention = predictor.memory_attention
    if not getattr(attention, "visionserve_memory_dtype", False):
        attention.register_forward_pre_hook(_memory_as_positions, with_kwargs=True)
        attention.visionserve_memory_dtype = True


# ----------------------------------------------------------------------------- video inference state


def new_inference_state(
    images: Any,
    num_frames: int,
    size: tuple[int, int] | None,
    device: torch.device,
    offload_video_to_cpu: bool,
    offload_state_to_cpu: bool,
) -> dict[str, Any]:
    """The state ``SAM2VideoPredictor.init_state`` builds, over ``images`` (indexable frames,
    normalised on access) instead of its file loader; ``size`` (height, width) None: not yet known."""
    return {
        "images": images,
        "num_frames": num_frames,
        "offload_video_to_cpu": offload_video_to_cpu,
        "offload_state_to_cpu": offload_state_to_cpu,
        "video_height": 0 if size is None else size[0],
        "video_width": 0 if size is None else size[1],
        "device": device,
        "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": {},
        "obj_idx_to_id": {},
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def num_frames(state: dict[str, Any]) -> int:
    return state["num_frames"]


def video_size(state: dict[str, Any]) -> tuple[int, int]:
    return state["video_height"], state["video_width"]


def set_video_size(state: dict[str, Any], height: int, width: int) -> None:
    state["video_height"], state["video_width"] = height, width


def object_ids(state: dict[str, Any]) -> list[int]:
    return state["obj_ids"]


def object_index(state: dict[str, Any], obj_id: int) -> int:
    return state["obj_id_to_idx"][obj_id]


def presence(state: dict[str, Any], obj_idx: int, frame_index: int) -> float:
    """Presence probability of an object on a frame, from the output its mask came from (0 where
    the object has none, e.g. before the frame it was first prompted on)."""
    for outputs in (state["temp_output_dict_per_obj"][obj_idx], state["output_dict_per_obj"][obj_idx]):
        for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
            out = outputs[key].get(frame_index)
            if out is not None:
                return float(torch.sigmoid(out["object_score_logits"].float()).max())
    return 0.0


def first_prompted_frame(state: dict[str, Any]) -> int:
    """``propagate_in_video``'s default start (after ``propagate_in_video_preflight``)."""
    return min(t for out in state["output_dict_per_obj"].values() for t in out["cond_frame_outputs"])


def drop_outputs_before(state: dict[str, Any], oldest: int) -> None:
    """Forget every object's non-conditioning outputs (and their tracked marks) before ``oldest``."""
    for obj_idx, outputs in state["output_dict_per_obj"].items():
        non_cond = outputs["non_cond_frame_outputs"]
        for t in [t for t in non_cond if t < oldest]:
            del non_cond[t]
        tracked = state["frames_tracked_per_obj"][obj_idx]
        for t in [t for t in tracked if t < oldest]:
            del tracked[t]


def state_without_frames(state: dict[str, Any]) -> dict[str, Any]:
    """Everything the state holds but its frames (for counting its memory)."""
    return {k: v for k, v in state.items() if k != "images"}
