"""SAM 3 video: build the tracking model, and sessions that segment and track every instance of a
concept (a text, exemplar boxes) or a clicked object over a clip or a live stream.

The model is sam3's own ``Sam3VideoInferenceWithInstanceInteractivity`` (its detector finds the
concept on every frame, its SAM 2-style tracker carries each instance, and its heuristics
associate the two); we drive it through its methods (``init_state``, ``add_prompt``,
``propagate_in_video``) so every frame's instances are the library's. What is ours:

* one builder for every size (:class:`Sam3VideoArch`; the defaults are sam3's
  ``build_sam3_video_model``, so the released checkpoint loads strictly; tests build a tiny one);
* in a server, the video model around the image model's detector (:func:`on_detector`,
  :func:`video_model`): one copy of the detector's weights, only the tracker (~45 MB at full
  size, float32) and its neck convolutions (~30 MB) added;
* sessions opened from frames in memory (sam3's loader for PIL frames), and live sessions;
* text encodings and image features kept across prompts (sam3 starts over on every concept
  prompt and recomputes both): :class:`CachedFeatures`.

A session holds one concept at a time: sam3's ``add_prompt`` with a text or boxes resets the
state, and its find-stage has one text slot, so several texts cannot share a detector pass.
An instance's ``score`` is sam3's ``out_probs``: the detection score it was first found with.

Live sessions grow sam3's per-frame lists by one frame per ``add_frame`` and run its
propagation over that frame alone (the same step offline propagation runs). They equal offline
propagation of a clip starting with the same frames (checked in the tests) when:

* the clip has at least 16 frames: the tracker scales object-pointer positions by
  ``min(num_frames, 16)``, and a live session's trackers see an unbounded clip;
* the model runs without sam3's temporal disambiguation (``temporal_disambiguation: false``):
  with it (the released setting) offline answers for frame t are held back until frame t + 15
  and hide instances that hot-start removed meanwhile; a live frame is answered at once with
  what is known then;
* the concept is not a text with exemplar boxes: offline, sam3 detects on the frame after the
  prompted one ahead of time, with the prompted frame's boxes; a live session has no next frame
  yet (boxes alone do not matter there: sam3 takes no new detections on unprompted frames).

Live sessions keep every frame and per-frame output (sam3's state has no window): memory grows
with the stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
from sam3.model.io_utils import load_resource_as_video_frames
from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
from sam3.model.model_misc import TransformerWrapper
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image, Sam3ImageOnVideoMultiGPU
from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
from sam3.model.sam3_video_inference import Sam3VideoInferenceWithInstanceInteractivity
from sam3.model.vl_combiner import SAM3VLBackbone
from sam3.sam.transformer import RoPEAttention

from apis.core.cache import LRUCache
from apis.core.errors import APIError
from apis.core.settings import ModelEntry
from apis.core.video import FrameResult, TrackedObject, check_frame
from apis.sam3 import internals
from apis.sam3.model import (
    TRACKER_NECK,
    Sam3Runner,
    Sam3VideoArch,
    detector_modules,
    dot_product_scoring,
    download_released,
)

# ----------------------------------------------------------------------------- architecture


def build_tracker(arch: Sam3VideoArch) -> Sam3TrackerPredictor:
    """sam3's SAM 2-style tracker as its ``build_tracker`` makes it, with ``arch``'s sizes."""
    internals.install_video()
    d = arch.d_model
    feat = arch.resolution // arch.patch_size
    mask_size = feat * 16  # sam3's 1152 at 1008 px: the tracker's input mask size
    maskmem = SimpleMaskEncoder(
        out_dim=arch.mem_dim,
        in_dim=d,
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=arch.mem_dim,
            normalize=True,
            scale=None,
            temperature=10000,
            precompute_resolution=arch.resolution,
        ),
        mask_downsampler=SimpleMaskDownSampler(
            embed_dim=d, kernel_size=3, stride=2, padding=1, interpol_size=[mask_size, mask_size]
        ),
        fuser=SimpleFuser(
            layer=CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1.0e-06, use_dwconv=True),
            num_layers=2,
        ),
    )

    def rope(**kwargs) -> RoPEAttention:
        return RoPEAttention(
            embedding_dim=d,
            num_heads=1,
            downsample_rate=1,
            dropout=0.1,
            rope_theta=10000.0,
            feat_sizes=[feat, feat],
            use_fa3=False,
            use_rope_real=False,
            **kwargs,
        )

    layer = TransformerDecoderLayerv2(
        cross_attention_first=False,
        activation="relu",
        dim_feedforward=arch.tracker_ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=rope(),
        d_model=d,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        cross_attention=rope(kv_in_dim=arch.mem_dim, rope_k_repeat=True),
    )
    encoder = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[],
        batch_first=True,
        d_model=d,
        frozen=False,
        pos_enc_at_input=True,
        layer=layer,
        num_layers=arch.tracker_layers,
        use_act_checkpoint=False,
    )
    return Sam3TrackerPredictor(
        image_size=arch.resolution,
        num_maskmem=arch.num_maskmem,
        backbone=None,
        backbone_stride=arch.patch_size,
        transformer=TransformerWrapper(encoder=encoder, decoder=None, d_model=d),
        maskmem_backbone=maskmem,
        multimask_output_in_sam=True,
        forward_backbone_per_frame_for_eval=True,
        trim_past_non_cond_mem_for_eval=False,
        multimask_output_for_tracking=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        always_start_from_first_ann_frame=False,
        non_overlap_masks_for_mem_enc=False,
        non_overlap_masks_for_output=False,
        max_cond_frames_in_attn=4,
        offload_output_to_cpu_for_eval=False,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
        clear_non_cond_mem_around_input=True,
        fill_hole_area=0,
        use_memory_selection=arch.temporal_disambiguation,
    )


def build_sam3_video(
    arch: Sam3VideoArch, bpe_path: str | None = None
) -> Sam3VideoInferenceWithInstanceInteractivity:
    """sam3's video model with random weights, built as ``build_sam3_video_model`` does (same
    classes, arguments and heuristics) with ``arch``'s sizes."""
    internals.install_video()
    tracker = build_tracker(arch)
    parts = detector_modules(arch, bpe_path, tracker_neck=True)
    parts["dot_prod_scoring"] = dot_product_scoring(arch)  # the video builder's own scorer (same sizes)
    return assemble(video_detector(parts), tracker, arch)


def video_detector(parts: dict[str, Any]) -> Sam3ImageOnVideoMultiGPU:
    """sam3's video detector on detector parts (:func:`~apis.sam3.model.detector_modules`)."""
    return Sam3ImageOnVideoMultiGPU(
        num_feature_levels=1,
        semantic_segmentation_head=None,
        use_early_fusion=True,
        use_dot_prod_scoring=True,
        supervise_joint_box_scores=True,
        **parts,
    )


def assemble(
    detector: Sam3ImageOnVideoMultiGPU, tracker: Sam3TrackerPredictor, arch: Sam3VideoArch
) -> Sam3VideoInferenceWithInstanceInteractivity:
    """sam3's video model with ``build_sam3_video_model``'s heuristics on a detector and a tracker."""
    hotstart = arch.temporal_disambiguation
    return Sam3VideoInferenceWithInstanceInteractivity(
        detector=detector,
        tracker=tracker,
        score_threshold_detection=0.5,
        assoc_iou_thresh=0.1,
        det_nms_thresh=0.1,
        new_det_thresh=0.7,
        hotstart_delay=15 if hotstart else 0,
        hotstart_unmatch_thresh=8 if hotstart else 0,
        hotstart_dup_thresh=8 if hotstart else 0,
        suppress_unmatched_only_within_hotstart=True,
        min_trk_keep_alive=-1,
        max_trk_keep_alive=30,
        init_trk_keep_alive=30,
        suppress_overlapping_based_on_recent_occlusion_threshold=0.7,
        suppress_det_close_to_boundary=False,
        fill_hole_area=16,
        recondition_every_nth_frame=16 if hotstart else 0,
        masklet_confirmation_enable=False,
        decrease_trk_keep_alive_for_empty_masklets=False,
        image_size=arch.resolution,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        compile_model=False,
    )


def load_video_checkpoint(model: Sam3VideoInferenceWithInstanceInteractivity, path: str | Path) -> None:
    """Load a SAM 3 checkpoint (the released ``sam3.pt``: ``detector.`` and ``tracker.`` keys) into
    the whole video model, strictly, as sam3's builder does, with an error that says what is off."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"SAM 3 checkpoint {path} does not fit the configured video architecture: {e}"
        ) from None


def load_sam3_video(
    entry: ModelEntry, device: str | torch.device
) -> Sam3VideoInferenceWithInstanceInteractivity:
    """Build the configured video model and load its weights: ``random``, a local checkpoint
    file, or (``weights`` null) sam3's own download of ``facebook/sam3``."""
    arch = Sam3VideoArch.from_json(entry.arch_config) if entry.arch_config is not None else Sam3VideoArch()
    model = build_sam3_video(arch)
    if entry.is_random:
        internals.init_untrained(model)
    else:
        path = entry.weights or download_released()
        if not Path(path).is_file():
            raise FileNotFoundError(f"SAM 3 checkpoint for {entry.name} not found: {path}")
        load_video_checkpoint(model, path)
    device = torch.device(device)
    model = model.to(device).eval()
    internals.move_caches(model, device)
    return model


def on_detector(image: Sam3Image, arch: Sam3VideoArch) -> Sam3VideoInferenceWithInstanceInteractivity:
    """sam3's video model around an image model's detector, sharing its modules (the vision
    trunk, text encoder, neck, transformer, geometry encoder, segmentation head and scorer: every
    detector weight) rather than holding a second copy of them (3.4 GB at full size). New: the
    tracker and the neck's second set of convolutions that feed it (sam3's ``add_sam2_neck``),
    which start as a clone of the detector's as sam3 builds them. Load their weights with
    :func:`load_tracker_weights`."""
    internals.install_video()
    tracker = build_tracker(arch)
    vl = image.backbone
    video_neck = internals.neck_with_tracker_convs(vl.vision_backbone, arch.d_model)
    parts = {
        "backbone": SAM3VLBackbone(visual=video_neck, text=vl.language_backbone, scalp=vl.scalp),
        "transformer": image.transformer,
        "input_geometry_encoder": image.geometry_encoder,
        "segmentation_head": image.segmentation_head,
        "dot_prod_scoring": image.dot_prod_scoring,
    }
    return assemble(video_detector(parts), tracker, arch)


TRACKER_KEYS = ("tracker.", "detector." + TRACKER_NECK)


def load_tracker_weights(model: Sam3VideoInferenceWithInstanceInteractivity, path: str | Path) -> None:
    """The weights :func:`on_detector` adds, from a checkpoint in the released layout (the
    detector's were loaded by the image model): strictly, every one of them and nothing else."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    own = {k: v for k, v in state.items() if k.startswith(TRACKER_KEYS)}
    expected = {k for k in model.state_dict() if k.startswith(TRACKER_KEYS)}
    missing, unexpected = sorted(expected - own.keys()), sorted(own.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"SAM 3 checkpoint {path} has no video tracker that fits the configured architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}); video sessions need the released layout (detector. and tracker. keys)"
        )
    model.load_state_dict(own, strict=False)


def video_model(runner: Sam3Runner) -> Sam3VideoInferenceWithInstanceInteractivity:
    """The video model on ``runner``'s detector (:func:`on_detector`), made on first use: the
    tracker's weights from the runner's checkpoint, or random ones seeded by the model's name
    (the same in every worker)."""
    if runner.video is None:
        entry = runner.entry
        arch = runner.arch if isinstance(runner.arch, Sam3VideoArch) else Sam3VideoArch(**vars(runner.arch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{entry.name if entry else ''}/tracker".encode()))
            model = on_detector(runner.model, arch)
        if entry is not None and not entry.is_random:
            load_tracker_weights(model, entry.weights or download_released())
        model = model.to(runner.device).eval()
        internals.move_caches(model, runner.device)
        runner.video = model
    return runner.video


# ----------------------------------------------------------------------------- sessions

DIRECTIONS = ("forward", "backward", "both")
LIVE_LENGTH = 2**31 - 1  # the num_frames a live session's trackers see: an unbounded clip

internals.silence_progress_bars()


class CachedFeatures:
    """Image features and text encodings kept across prompts: sam3 starts over on every concept
    prompt (``reset_state`` empties its feature cache), so a second text on a frame would run the
    vision backbone and the text encoder again. Wraps the detector backbone's ``forward_image``
    and ``forward_text`` of one model: texts in a model-wide LRU by caption batch; images in the
    LRU of the session being served (:attr:`images`, set around each of its steps), by content,
    so a frame is recognised whatever path indexed it. Outputs are the same tensors the backbone
    would compute again (the model is in eval mode and deterministic)."""

    def __init__(self, backbone: torch.nn.Module, texts: int = 64):
        self.texts: LRUCache[dict] = LRUCache(texts)
        self.images: LRUCache[dict] | None = None
        self.image_passes = 0
        self.text_passes = 0
        forward_image, forward_text = backbone.forward_image, backbone.forward_text

        def image(samples: torch.Tensor) -> dict:
            if self.images is None:
                return forward_image(samples)
            key = (
                f"{tuple(samples.shape)}{samples.dtype}"
                + hashlib.blake2b(
                    samples.detach().cpu().contiguous().numpy().tobytes(), digest_size=16
                ).hexdigest()
            )
            out = self.images.get(key)
            if out is None:
                out = forward_image(samples)
                self.image_passes += 1
                self.images.put(key, out)
            return out

        def text(captions, input_boxes=None, additional_text=None, device="cuda") -> dict:
            if input_boxes is not None or additional_text is not None:
                return forward_text(captions, input_boxes, additional_text, device)
            key = "\0".join(captions) + f"\0{device}"
            out = self.texts.get(key)
            if out is None:
                out = forward_text(captions, device=device)
                self.text_passes += 1
                self.texts.put(key, out)
            return out

        internals.replace_backbone_forwards(backbone, image, text)

    @contextlib.contextmanager
    def serving(self, images: LRUCache[dict]) -> Iterator[None]:
        self.images = images
        try:
            yield
        finally:
            self.images = None


def features(model: Sam3VideoInferenceWithInstanceInteractivity) -> CachedFeatures:
    """The model's :class:`CachedFeatures`, installed on first use."""
    return internals.kept_on(model, lambda: CachedFeatures(model.detector.backbone))


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the tensors reachable from ``obj``, each storage counted once."""
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return _tensor_bytes(vars(obj), seen)
    return 0


class VideoSession:
    """One clip, owned by one worker (its state cannot move), holding one concept at a time.

    A text or exemplar-box prompt is a concept: sam3 starts the session's tracking over with it
    (every earlier instance goes) and finds its instances on the prompted frame; ``propagate``
    then detects and tracks them over the clip, instances appearing and disappearing. Points
    refine one instance (``obj_id``) or add one, on a frame that already has outputs.

    Cheap: ``describe``, ``close``. Expensive (the model runs): ``add_prompt`` (the detector on
    one frame, its image features reused when cached), each step of ``propagate`` (one frame).
    """

    def __init__(
        self,
        model: Sam3VideoInferenceWithInstanceInteractivity,
        state: dict | None,
        *,
        offload_video_to_cpu: bool,
        feature_frames: int,
    ):
        self.model = model
        self.state = state  # a live session's is made with its first frame
        self.live = state is None
        self.closed = False
        self.offload_video_to_cpu = offload_video_to_cpu
        self.num_frames = 0 if state is None else internals.num_frames(state)
        self.height, self.width = (0, 0) if state is None else internals.frame_size(state)
        self.features = features(model)
        self.image_features: LRUCache[dict] = LRUCache(feature_frames)
        self.text: str | None = None
        self.refined = False  # points were added: sam3 then propagates from earlier outputs only

    @classmethod
    def open(
        cls,
        model: Sam3VideoInferenceWithInstanceInteractivity,
        frames: Sequence[np.ndarray] | None,
        *,
        offload_video_to_cpu: bool = True,
        feature_frames: int = 2,
    ) -> VideoSession:
        """A session over ``frames`` (RGB uint8, one size), through sam3's ``init_state`` (its
        loader for in-memory frames, so the model sees the library's pixels), or a live one when
        None. The clip is held resized to the model's input in float16, as sam3 holds it;
        ``offload_video_to_cpu`` keeps it in CPU memory. ``feature_frames``: how many frames'
        image features the session keeps for new prompts (2: a prompted frame and the next one,
        which sam3 detects on ahead of time; about 0.45 GB a frame at full size)."""
        if frames is None:
            return cls(model, None, offload_video_to_cpu=offload_video_to_cpu, feature_frames=feature_frames)
        if len(frames) == 0:
            raise APIError(400, "the video has no frames", param="frames")
        images: list[Image.Image] = []
        size: tuple[int, int] | None = None
        for i, frame in enumerate(frames):
            images.append(Image.fromarray(check_frame(frame, size, f"frame {i}")))
            size = (images[-1].height, images[-1].width)
        state = model.init_state(resource_path=images, offload_video_to_cpu=offload_video_to_cpu)
        return cls(model, state, offload_video_to_cpu=offload_video_to_cpu, feature_frames=feature_frames)

    # ------------------------------------------------------------------------- helpers

    def _state(self) -> dict:
        if self.closed:
            raise APIError(404, "this video session is closed", code="session_not_found")
        if self.state is None:
            raise APIError(400, "this live session has no frames yet: add one first", param="frame_index")
        return self.state

    def _unbounded(self) -> None:
        """A live session's trackers see an unbounded clip (see the module's notes)."""
        if self.live:
            internals.set_tracker_length(self._state(), LIVE_LENGTH)

    def _check_frame_index(self, frame_index: int, param: str = "frame_index") -> None:
        if not 0 <= frame_index < self.num_frames:
            raise APIError(
                400,
                f"{param} {frame_index} is out of range: the session has {self.num_frames} frames",
                param=param,
            )

    def _result(self, frame_index: int, out: dict) -> FrameResult:
        """sam3's post-processed outputs of one frame as a FrameResult (instances by id)."""
        return FrameResult(
            frame_index=frame_index,
            objects=[
                TrackedObject(obj_id=int(obj_id), mask=np.asarray(mask, dtype=bool), score=float(score))
                for obj_id, score, mask in zip(
                    out["out_obj_ids"], out["out_probs"], out["out_binary_masks"], strict=True
                )
            ],
        )

    def _boxes(self, boxes: Sequence[Sequence[float]], labels: Sequence[bool] | None) -> tuple[list, list]:
        """Pixel [x1, y1, x2, y2] boxes as the normalised [x, y, w, h] that sam3 takes."""
        if labels is None:
            labels = [True] * len(boxes)
        if len(labels) != len(boxes):
            raise APIError(400, f"{len(boxes)} boxes but {len(labels)} box_labels", param="box_labels")
        out = []
        for i, box in enumerate(boxes):
            if len(box) != 4:
                raise APIError(400, f"box {i} must be [x1, y1, x2, y2] in pixels", param="boxes")
            x1, y1, x2, y2 = (float(v) for v in box)
            if not (0 <= x1 < x2 <= self.width and 0 <= y1 < y2 <= self.height):
                raise APIError(
                    400,
                    f"box {i} {list(box)} must satisfy 0 <= x1 < x2 <= {self.width} and "
                    f"0 <= y1 < y2 <= {self.height}",
                    param="boxes",
                )
            out.append([x1 / self.width, y1 / self.height, (x2 - x1) / self.width, (y2 - y1) / self.height])
        return out, [int(bool(v)) for v in labels]

    # ------------------------------------------------------------------------- the model

    @torch.inference_mode()
    def add_prompt(
        self,
        frame_index: int,
        *,
        text: str | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        box_labels: Sequence[bool] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        obj_id: int | None = None,
    ) -> FrameResult:
        """A concept (``text``, exemplar ``boxes`` in pixels with ``box_labels``, or both) on a
        frame, or ``points`` (pixels, labels 1 = in, 0 = out) for instance ``obj_id``. Answers
        the frame's instances."""
        state = self._state()
        self._check_frame_index(frame_index)
        if self.live and frame_index != self.num_frames - 1:
            raise APIError(
                400,
                f"a live session is prompted on its newest frame ({self.num_frames - 1}), not {frame_index}",
                param="frame_index",
            )
        if points is not None:
            if text is not None or boxes is not None:
                raise APIError(
                    400, "points refine one instance: send them without text or boxes", param="points"
                )
            if obj_id is None:
                raise APIError(
                    400, "points need the obj_id of the instance they refine or add", param="obj_id"
                )
            if point_labels is None or len(point_labels) != len(points) or not points:
                raise APIError(
                    400, "points need one point_label (1 in, 0 out) per point", param="point_labels"
                )
            if not internals.has_outputs(state, frame_index):
                raise APIError(
                    400,
                    f"frame {frame_index} has no outputs yet: prompt a concept and propagate "
                    "before refining with points",
                    param="frame_index",
                )
            coords = torch.tensor(points, dtype=torch.float32)
            if coords.ndim != 2 or coords.shape[1] != 2:
                raise APIError(400, "points must be [[x, y], ...] in pixels", param="points")
            coords /= torch.tensor([self.width, self.height], dtype=torch.float32)
            self.refined = True
            kwargs = {
                "points": coords,
                "point_labels": torch.tensor(point_labels, dtype=torch.int32),
                "obj_id": obj_id,
            }
        else:
            if text is None and not boxes:
                raise APIError(400, "a prompt needs a text, boxes or points", param="text")
            if boxes and text is None and len(boxes) != 1:
                raise APIError(
                    400,
                    "a concept from boxes alone takes one exemplar box (add a text to give several)",
                    param="boxes",
                )
            kwargs = {"text_str": text}
            if boxes:
                kwargs["boxes_xywh"], kwargs["box_labels"] = self._boxes(boxes, box_labels)
            self.text = text
            self.refined = False
        with self.features.serving(self.image_features):
            _, out = self.model.add_prompt(state, frame_index, **kwargs)
        if self.live:  # propagation's first step, as offline propagation would run it on this frame
            self._unbounded()
            return self._step(frame_index)
        return self._result(frame_index, out)

    def propagate(
        self, direction: str = "forward", start_frame_index: int | None = None, max_frames: int | None = None
    ) -> Iterator[FrameResult]:
        """Every frame's instances from ``start_frame_index`` (the first prompted frame by
        default) over at most ``max_frames`` frames each way, lazily: one frame per ``next()``.
        ``both`` runs forward from the start frame, then backward from it."""
        state = self._state()
        if direction not in DIRECTIONS:
            raise APIError(
                400, f"direction must be one of {list(DIRECTIONS)}, got {direction!r}", param="direction"
            )
        if start_frame_index is not None:
            self._check_frame_index(start_frame_index, "start_frame_index")
        if max_frames is not None and max_frames < 1:
            raise APIError(400, f"max_frames must be at least 1, got {max_frames}", param="max_frames")
        if not internals.prompted(state):
            raise APIError(400, "add a prompt before propagating", param="frame_index")
        reverses = {"forward": [False], "backward": [True], "both": [False, True]}[direction]
        if self.refined:  # sam3 asserts that every frame it goes over after points has outputs
            for reverse in reverses:
                order = internals.processing_order(self.model, state, start_frame_index, max_frames, reverse)
                missing = [t for t in order if not internals.has_outputs(state, t)]
                if missing:
                    raise APIError(
                        400,
                        f"frame {missing[0]} has no tracked outputs for the points to refine: propagate "
                        "the concept over these frames first, then add points",
                        param="start_frame_index",
                    )
        return self._propagate(state, reverses, start_frame_index, max_frames)

    def _propagate(
        self, state: dict, reverses: list[bool], start: int | None, max_frames: int | None
    ) -> Iterator[FrameResult]:
        for reverse in reverses:
            steps = self.model.propagate_in_video(
                state, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse
            )
            while True:
                with self.features.serving(self.image_features):
                    step = next(steps, None)
                if step is None:
                    break
                yield self._result(*step)

    @torch.inference_mode()
    def add_frame(self, image: np.ndarray) -> FrameResult:
        """Append a frame to a live session and, once a concept is prompted, detect and track
        on it at once (sam3's per-frame step, as its propagation runs it). Before any prompt
        the frame is only held and answers no instances."""
        if self.closed:
            raise APIError(404, "this video session is closed", code="session_not_found")
        if not self.live:
            raise APIError(400, "frames are added to live sessions only; this one was opened on a clip")
        pil = Image.fromarray(
            check_frame(
                image, None if self.state is None else (self.height, self.width), f"frame {self.num_frames}"
            )
        )
        if self.state is None:
            self.state = self.model.init_state(
                resource_path=[pil], offload_video_to_cpu=self.offload_video_to_cpu
            )
            internals.make_growable(self.state)
            self.height, self.width = internals.frame_size(self.state)
        else:
            self._append(self.state, pil)
        state = self.state
        self.num_frames = internals.num_frames(state)
        index = self.num_frames - 1
        if not internals.prompted(state):
            return FrameResult(frame_index=index, objects=[])
        return self._step(index)

    def _step(self, index: int) -> FrameResult:
        """sam3's propagation over one frame of a live session."""
        steps = internals.propagate_one(self.model, self._state(), index)
        with self.features.serving(self.image_features):
            (_, out), *_ = list(steps)
        self._unbounded()
        return self._result(index, out)

    def _append(self, state: dict, image: Image.Image) -> None:
        """One more frame in sam3's state: its pixels through sam3's own loader, its find-stage
        (a copy of frame 0's, which holds the session's text id) and empty per-frame inputs."""
        pixels, _, _ = load_resource_as_video_frames(
            [image],
            image_size=self.model.image_size,
            offload_video_to_cpu=self.offload_video_to_cpu,
            img_mean=self.model.image_mean,
            img_std=self.model.image_std,
        )
        internals.append_frame(state, pixels[0])

    def describe(self) -> dict[str, Any]:
        """Frames, the instances of the latest outputs, and the bytes of tensors the session holds."""
        if self.state is None and not self.closed:
            return {"num_frames": 0, "objects": [], "text": None, "memory_bytes": 0, "frames_held": 0}
        state = self._state()
        objects = sorted(internals.object_ids(state))
        return {
            "num_frames": self.num_frames,
            "objects": objects,
            "text": self.text,
            "memory_bytes": _tensor_bytes(state, set()) + _tensor_bytes(self.image_features.values(), set()),
            "frames_held": self.num_frames,
        }

    def close(self) -> None:
        """Drop the session's state and cached features (sam3 keeps nothing outside the state)."""
        self.state = None
        self.closed = True
        self.image_features = LRUCache(0)
