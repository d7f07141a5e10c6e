"""What sam3 0.1.4 needs to run on a CPU-only host, on a second GPU, and with random weights.

Each patch below fixes one place where the library assumes the first CUDA device; none changes
a number the model computes. :func:`install` is idempotent and runs before any model is built.

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

import functools

import torch
from open_clip.tokenizer import default_bpe
from sam3.model.decoder import TransformerDecoder
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.text_encoder_ve import TextTransformer

_MARK = "_visionserve_cpu_safe"


def bpe_path() -> str:
    """The CLIP BPE vocabulary sam3's tokenizer reads (the copy inside open_clip)."""
    return default_bpe()


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
