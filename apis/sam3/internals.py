"""Every contact with sam3's internals, checked against sam3 0.1.4 (the pin in pyproject.toml).

sam3 has public entry points for what the server does on whole requests (``Sam3Processor``,
``Sam3Image.forward_grounding``, the video model's ``init_state``, ``add_prompt`` and
``propagate_in_video``); apis/sam3/model.py and video.py use those. What has no public API is
here: patches that let the library run on a CPU-only host, on a second GPU and with random
weights; two private methods (the empty geometric prompt, the propagation order); module
attributes replaced (the progress bar, the connected-components kernel); the video neck's
tracker convolutions; the backbone's forwards routed through a cache; and the video inference
state, read and grown through the functions at the end. tests/unit/test_internals_contract.py
fails on another release and checks each name used here.

The patches: none changes a number the model computes. :func:`install` is idempotent and runs
before any model is built.

* ``PositionEmbeddingSine(precompute_resolution=...)`` fills its cache with tensors made on
  ``"cuda"``. Without CUDA we skip the precomputation: ``forward`` computes and caches the same
  values on first use, on the input's device.
* ``TransformerDecoder.__init__`` builds its box-bias coordinates with ``device="cuda"``.
  Without CUDA they are made on the CPU instead.
* ``geometry_encoders`` pins a small tensor (``Tensor.pin_memory``) on every prompt, text ones
  included. Pinning needs a CUDA driver; without one it is a no-op here.
* Both caches above are plain dicts, which ``model.to(device)`` does not move: after moving a
  model, :func:`move_caches` puts them on the model's device (a worker on ``cuda:1`` or ``cpu``
  of a GPU host would otherwise mix devices).
* The wheel ships no BPE vocabulary; open_clip packages the same ``bpe_simple_vocab_16e6``.
* ``TextTransformer.positional_embedding`` and ``text_projection`` are ``torch.empty``: a
  checkpoint overwrites them, but a random-weights model would compute NaN scores from
  whatever memory they held. :func:`init_untrained` gives them open_clip's initialisation.

The video model (:func:`install_video`, on top of the above) needs four more:

* ``Sam3ImageOnVideoMultiGPU._build_multigpu_buffer_next_chunk`` casts the tracker's backbone
  features to bfloat16 "for all-gather", counting on CUDA autocast (which sam3 enters for the
  whole process) to feed them to float32 convolutions; on CPU ``run_backbone_and_detection``
  then fails in ``conv_s0``. Without autocast we cast them back to the model's dtype after the
  buffer is built: the values stay the bfloat16-rounded ones sam3 uses on a GPU.
* ``Sam3TrackerPredictor.init_state`` keeps per-frame state on ``torch.device("cuda")`` unless
  offloaded; sam3's video model never offloads it. We keep it on the tracker's own device.
* ``Tensor.cuda`` is called unconditionally to bring memory features back "to the GPU"
  (``Sam3TrackerBase._prepare_memory_conditioned_features``, the tracker's point prompts):
  without CUDA it returns the tensor itself (the model's device is the CPU).
* ``connected_components_cpu`` (hole filling of every new mask) needs scikit-image and fails
  on an empty batch (a frame with no detections); :func:`connected_components_cpu` is the
  same computation with OpenCV, any batch size.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from sam3.model.decoder import TransformerDecoder
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.text_encoder_ve import TextTransformer

from apis import open_clip_internals

SAM3_VERSION = "0.1.4"

_MARK = "_visionserve_cpu_safe"
_KEPT = "_visionserve_kept"
T = TypeVar("T")

# sam3's video modules are imported by the functions that need them: the image routes never do.


def bpe_path() -> str:
    """The CLIP BPE vocabulary sam3's tokenizer reads (the copy inside open_clip)."""
    return open_clip_internals.bpe_vocabulary()


def install() -> None:
    if getattr(PositionEmbeddingSine.__init__, _MARK, False):
        return

    original_init = PositionEmbeddingSine.__init__

    @functools.wraps(original_init)
    def pos_init(self, *args, precompute_resolution=None, **kwargs):
        if not torch.cuda.is_available():
            precompute_resolution = None
        original_init(self, *args, precompute_resolution=precompute_resolution, **kwargs)

    setattr(pos_init, _MARK, True)
    PositionEmbeddingSine.__init__ = pos_init

    original_coords = TransformerDecoder._get_coords

    def get_coords(H, W, device):  # noqa: N803 (the library's names)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        return original_coords(H, W, device)

    TransformerDecoder._get_coords = staticmethod(get_coords)

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def move_caches(model: torch.nn.Module, device: torch.device) -> None:
    """Put the position-encoding and box-coordinate caches on ``device`` (see module docstring)."""
    for module in model.modules():
        if isinstance(module, PositionEmbeddingSine):
            module.cache = {k: v.to(device) for k, v in module.cache.items()}
        elif isinstance(module, TransformerDecoder):
            coords = getattr(module, "compilable_cord_cache", None)
            if coords is not None:
                module.compilable_cord_cache = tuple(t.to(device) for t in coords)
            cache = getattr(module, "coord_cache", {})
            module.coord_cache = {k: tuple(t.to(device) for t in v) for k, v in cache.items()}


def init_untrained(model: torch.nn.Module) -> None:
    """open_clip's initialisation for the two text-encoder parameters sam3 leaves empty."""
    for module in model.modules():
        if isinstance(module, TextTransformer):
            torch.nn.init.normal_(module.positional_embedding, std=0.01)
            if isinstance(module.text_projection, torch.nn.Parameter):
                torch.nn.init.normal_(module.text_projection, std=module.width**-0.5)


def install_video() -> None:
    """:func:`install`, and what sam3's video model needs besides (the module docstring)."""
    install()
    from sam3.model.sam3_image import Sam3ImageOnVideoMultiGPU

    if getattr(Sam3ImageOnVideoMultiGPU._build_multigpu_buffer_next_chunk, _MARK, False):
        return
    original_chunk = Sam3ImageOnVideoMultiGPU._build_multigpu_buffer_next_chunk

    @functools.wraps(original_chunk)
    def build_chunk(self, *args, frame_idx_begin, frame_idx_end, multigpu_buffer, **kwargs):
        original_chunk(
            self,
            *args,
            frame_idx_begin=frame_idx_begin,
            frame_idx_end=frame_idx_end,
            multigpu_buffer=multigpu_buffer,
            **kwargs,
        )
        weight = next(self.parameters())
        if torch.is_autocast_enabled(weight.device.type):
            return
        dtype = weight.dtype
        for frame in range(frame_idx_begin, frame_idx_end):
            entry = multigpu_buffer.get(frame, {})
            for key in ("tracker_backbone_fpn_0", "tracker_backbone_fpn_1", "tracker_backbone_fpn_2"):
                if key in entry:
                    value, handle = entry[key]
                    entry[key] = (value.to(dtype), handle)

    setattr(build_chunk, _MARK, True)
    Sam3ImageOnVideoMultiGPU._build_multigpu_buffer_next_chunk = build_chunk
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
    from sam3.perflib import connected_components as cc

    original_state = Sam3TrackerPredictor.init_state

    @functools.wraps(original_state)
    def tracker_state(self, *args, **kwargs):
        state = original_state(self, *args, **kwargs)
        if not state["offload_state_to_cpu"]:
            state["storage_device"] = self.device
        return state

    Sam3TrackerPredictor.init_state = tracker_state
    cc.connected_components_cpu = connected_components_cpu
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self


def connected_components_cpu(masks: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sam3's CPU connected components, with OpenCV: per pixel, its component's label (0 for
    background) and the component's size (0 for background), 8-connected as scikit-image's
    ``label``. Labels may be numbered differently; sam3 reads only ``label > 0`` and the sizes."""
    import cv2
    import numpy as np

    shape = masks.shape
    planes = masks.reshape(-1, *shape[-2:]).cpu().numpy().astype(np.uint8)
    labels = np.zeros(planes.shape, dtype=np.int64)
    counts = np.zeros(planes.shape, dtype=np.int64)
    for i, plane in enumerate(planes):
        _, labels[i], stats, _ = cv2.connectedComponentsWithStats(plane, connectivity=8, ltype=cv2.CV_32S)
        sizes = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
        sizes[0] = 0
        counts[i] = sizes[labels[i]]
    device = masks.device
    return torch.from_numpy(labels).to(device).view(shape), torch.from_numpy(counts).to(device).view(shape)


# ----------------------------------------------------------------------------- image model


def dummy_prompt(model: torch.nn.Module, n: int) -> Any:
    """The empty geometric prompt of ``n`` find-queries (``Sam3Image._get_dummy_prompt``)."""
    return model._get_dummy_prompt(num_prompts=n)


# ----------------------------------------------------------------------------- video model


def neck_with_tracker_convs(neck: Sam3DualViTDetNeck, d_model: int) -> Sam3DualViTDetNeck:
    """A neck on ``neck``'s trunk and convolutions, plus the second set of convolutions that feed
    the video tracker (sam3's ``add_sam2_neck``), cloned from the first as sam3 builds them."""
    video_neck = Sam3DualViTDetNeck(
        trunk=neck.trunk,
        position_encoding=neck.position_encoding,
        d_model=d_model,
        scale_factors=neck.scale_factors,
    )
    video_neck.convs = neck.convs
    video_neck.sam2_convs = copy.deepcopy(neck.convs)
    return video_neck


def _tqdm_off(iterable=None, *args, **kwargs):
    return iterable


def silence_progress_bars() -> None:
    """sam3 draws a tqdm bar per propagation (one per live frame in a server's log): none here."""
    from sam3.model import sam3_video_inference

    sam3_video_inference.tqdm = _tqdm_off


def replace_backbone_forwards(backbone: torch.nn.Module, image: Callable, text: Callable) -> None:
    """Route the detector backbone's ``forward_image`` and ``forward_text``, which the video model
    calls on every frame and prompt, through ``image`` and ``text``."""
    backbone.forward_image = image
    backbone.forward_text = text


def kept_on(model: torch.nn.Module, make: Callable[[], T]) -> T:
    """An object kept on ``model`` as long as the model lives (sam3 has no slot for it), made by
    ``make`` on first use."""
    kept = getattr(model, _KEPT, None)
    if kept is None:
        kept = make()
        setattr(model, _KEPT, kept)
    return kept


# ----------------------------------------------------------------------------- video inference state

# sam3's per-frame prompt lists (``Sam3VideoInference._construct_initial_input_batch``)
PER_FRAME_INPUTS = (
    "previous_stages_out",
    "per_frame_raw_point_input",
    "per_frame_raw_box_input",
    "per_frame_visual_prompt",
    "per_frame_geometric_prompt",
)


def num_frames(state: dict[str, Any]) -> int:
    return state["num_frames"]


def frame_size(state: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the session's frames as they came."""
    return state["orig_height"], state["orig_width"]


def prompted(state: dict[str, Any]) -> bool:
    """Whether a concept was prompted on some frame."""
    return not all(out is None for out in state["previous_stages_out"])


def has_outputs(state: dict[str, Any], frame_index: int) -> bool:
    """Whether the frame has tracked outputs (a prompt or a propagation reached it)."""
    return frame_index in state["cached_frame_outputs"]


def object_ids(state: dict[str, Any]) -> set[int]:
    """The ids of every instance in the frames' outputs."""
    return {int(i) for out in state["cached_frame_outputs"].values() for i in out}


def set_tracker_length(state: dict[str, Any], length: int) -> None:
    """The clip length the trackers see (it scales their object-pointer positions)."""
    for tracker_state in state["tracker_inference_states"]:
        tracker_state["num_frames"] = length


def processing_order(
    model: torch.nn.Module, state: dict[str, Any], start: int | None, max_frames: int | None, reverse: bool
) -> list[int]:
    """The frames ``propagate_in_video`` goes over with these arguments, in order."""
    order, _ = model._get_processing_order(state, start, max_frames, reverse)
    return list(order)


def propagate_one(model: torch.nn.Module, state: dict[str, Any], frame_index: int) -> Any:
    """The base class's propagation over one frame: the interactive subclass answers a second
    call from what the first cached (its action history) instead of running the new frame."""
    from sam3.model.sam3_video_inference import Sam3VideoInference

    return Sam3VideoInference.propagate_in_video(
        model, state, start_frame_idx=frame_index, max_frame_num_to_track=0
    )


def make_growable(state: dict[str, Any]) -> None:
    """Let :func:`append_frame` add frames to a state that ``init_state`` made."""
    state["input_batch"].img_batch = list(state["input_batch"].img_batch)


def append_frame(state: dict[str, Any], pixels: torch.Tensor) -> None:
    """One more frame: its pixels (as sam3's loader makes them), its find-stage (a copy of frame
    0's, which holds the session's text id) and empty per-frame inputs."""
    batch = state["input_batch"]
    index = len(batch.img_batch)
    batch.img_batch.append(pixels)
    stage = copy.deepcopy(batch.find_inputs[0])
    stage.img_ids.fill_(index)
    batch.find_inputs.append(stage)
    batch.find_targets.append(None)
    batch.find_metadatas.append(None)
    for key in PER_FRAME_INPUTS:
        state[key].append(None)
    state["per_frame_cur_step"].append(0)
    state["num_frames"] = index + 1
