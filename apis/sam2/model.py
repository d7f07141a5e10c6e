"""SAM 2 maths: configured variants, cached and batched image embeddings, prompts, automatic masks.

Plain functions and classes on sam2's own ``SAM2ImagePredictor`` and
``SAM2AutomaticMaskGenerator``, callable from tests and benchmarks without a server. Two things
are added to the library: an LRU cache of image embeddings (a prompt on a cached image never
runs the image encoder) and a CPU version of the connected-components kernel that sam2 only
ships for CUDA (without it ``max_hole_area``, ``max_sprinkle_area`` and AMG's
``min_mask_region_area`` are silently skipped).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sam2.build_sam import build_sam2_video_predictor, build_sam2_video_predictor_hf
from sam2.sam2_image_predictor import SAM2ImagePredictor

from apis.core.cache import LRUCache
from apis.core.precision import Autocast
from apis.core.settings import ModelEntry
from apis.sam2 import internals
from apis.sam2.options import SIZES, VARIANT, variant_name


def architecture(entry: ModelEntry) -> tuple[str, list[str]]:
    """(sam2 package config name, hydra overrides) for a configured model.

    ``arch_config`` JSON (``{"config": "configs/sam2.1/sam2.1_hiera_t.yaml", "overrides": [...]}``)
    describes models that are not one of the eight released variants (the tiny test one).
    """
    if entry.arch_config is not None:
        spec = json.loads(Path(entry.arch_config).read_text())
        return spec["config"], list(spec.get("overrides", []))
    name = variant_name(entry.name) or ""
    m = VARIANT.fullmatch(name)
    if m is None:
        raise ValueError(
            f"unknown SAM 2 model {entry.name!r}: use a variant such as sam2.1_hiera_l "
            "(sam2 or sam2.1 x hiera t, s, b+, l) or give an arch_config"
        )
    return f"configs/{m.group(1)}/{name}.yaml", []


def hf_repo(entry: ModelEntry) -> str:
    """The hub repo of the released variant the entry is named after (its ``arch_config``, if
    any, only changes the architecture the checkpoint is loaded into)."""
    m = VARIANT.fullmatch(variant_name(entry.name) or "")
    if m is None:
        raise ValueError(f"{entry.name}: give `weights` (a checkpoint file); only released variants download")
    return f"facebook/{m.group(1)}-hiera-{SIZES[m.group(2)].replace('_', '-')}"


# ----------------------------------------------------------------------------- CPU post-processing


def connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-connected components of (N, 1, H, W) binary masks, as sam2's CUDA kernel returns them:
    a label per foreground pixel (0 on background) and the area of each pixel's component.

    All N masks are labelled in one OpenCV call: stacked into one tall image with a row and a
    column of background after each, so no component can reach into the next mask.
    """
    n, _, h, w = mask.shape
    tiles = np.zeros((n, h + 1, w + 1), dtype=np.uint8)
    tiles[:, :h, :w] = mask.detach().to("cpu", torch.uint8).numpy()[:, 0]
    _, labels, stats, _ = cv2.connectedComponentsWithStats(tiles.reshape(n * (h + 1), w + 1), connectivity=8)
    labels = labels.reshape(n, h + 1, w + 1)[:, :h, :w]
    areas = np.where(labels > 0, stats[labels, cv2.CC_STAT_AREA], 0)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)[:, None]).to(mask.device)  # noqa: E731
    return as_tensor(labels), as_tensor(areas)


def install_cpu_connected_components() -> None:
    """Route sam2's connected-components calls to :func:`connected_components` unless the CUDA
    kernel is built and the mask is on a GPU. Idempotent."""
    internals.route_connected_components(connected_components)


# ----------------------------------------------------------------------------- embeddings


@dataclass
class Embedding:
    """What SAM2ImagePredictor keeps after ``set_image``: enough to prompt without the encoder."""

    image_embed: torch.Tensor  # (1, C, h, w)
    high_res_feats: list[torch.Tensor]
    orig_hw: tuple[int, int]
    file: bytes | None = None  # the image file: auto_mask on an image_id needs pixels for its crops
    #: the mask decoder's image-only work, computed at the image's first prompt (hiera_l: 6 MB)
    decoder_side: tuple[torch.Tensor, ...] | None = None


class Sam2Predictor(SAM2ImagePredictor, Autocast):
    """SAM2ImagePredictor whose image embeddings come from an LRU cache, missing ones computed
    in one batch. ``encoded_images`` counts what the image encoder actually processed and
    ``encoder_batches`` its forwards by batch size. ``prompt_threads`` and
    ``parallel_prompts``: how a batch's prompts share the CPU (:meth:`thread_plan`);
    ``trace_decoder``: on CPU, the decoder traced by torch.jit, once per kind of prompt
    (float32)."""

    def __init__(
        self,
        model,
        cache_size: int,
        dtype: torch.dtype = torch.float32,
        prompt_threads: int = 0,
        parallel_prompts: int = 0,
        trace_decoder: bool = True,
    ):
        super().__init__(model)
        self.prompt_threads = prompt_threads
        self.parallel_prompts = parallel_prompts
        self.trace_decoder = trace_decoder and dtype == torch.float32 and self.device.type == "cpu"
        self._decoders: dict[tuple[bool, ...], internals.PromptDecoder] = {}
        self._traced: dict[tuple[bool, ...], Any] = {}
        self._tracing = threading.Lock()
        internals.set_feature_sizes(self, model.image_size)
        self.cache: LRUCache[Embedding] = LRUCache(cache_size)
        self.dtype = dtype
        self.encoded_images = 0
        self.encoder_batches: Counter[int] = Counter()
        self._whole: tuple[str, np.ndarray, bytes | None] | None = (
            None  # auto_mask's image: key, pixels, file
        )
        model.image_encoder.register_forward_hook(self._count)

    def _count(self, _module, inputs, _output) -> None:
        self.encoded_images += inputs[0].shape[0]
        self.encoder_batches[inputs[0].shape[0]] += 1

    @property
    def low_res_size(self) -> int:
        return self.model.image_size // 4

    def configure(self, mask_threshold: float, max_hole_area: float, max_sprinkle_area: float) -> None:
        """Per-request post-processing settings (the library fixes them at construction)."""
        internals.set_postprocessing(self, mask_threshold, max_hole_area, max_sprinkle_area)

    @torch.inference_mode()
    def embeddings(
        self,
        keys: Sequence[str],
        images: Sequence[np.ndarray | None],
        files: Sequence[bytes | None] | None = None,
    ) -> list[Embedding | None]:
        """Embeddings of whole HWC uint8 images by cache key (their image_id): cached ones reused,
        the missing images encoded as one batch and kept with their ``files``; a key given
        without an image is only looked up (None if not cached)."""

        def encode(todo: list[int]) -> list[Embedding]:
            with self.autocast():
                SAM2ImagePredictor.set_image_batch(self, [images[i] for i in todo])
            feats = internals.features(self)
            out = [
                Embedding(  # copies, so an evicted entry frees its memory
                    image_embed=feats["image_embed"][j : j + 1].clone(),
                    high_res_feats=[f[j : j + 1].clone() for f in feats["high_res_feats"]],
                    orig_hw=tuple(images[i].shape[:2]),
                    file=None if files is None else files[i],
                )
                for j, i in enumerate(todo)
            ]
            self.reset_predictor()
            return out

        return self.cache.fetch_or_find(keys, images, encode)

    def use(self, emb: Embedding) -> None:
        """Make ``emb`` the current image, as if ``set_image`` had just computed it."""
        internals.use_features(self, emb.image_embed, emb.high_res_feats, emb.orig_hw)

    def set_image(self, image) -> None:
        """The automatic mask generator's entry point: the whole image goes through the cache, its
        crops (other shapes) are encoded as usual and not kept."""
        if self._whole is not None and isinstance(image, np.ndarray) and image.shape == self._whole[1].shape:
            key, whole, file = self._whole
            self.use(self.embeddings([key], [whole], [file])[0])
        else:
            super().set_image(image)

    def thread_plan(self, prompts: int) -> tuple[int, int]:
        """(prompts decoded at once, torch threads for each) for a batch of ``prompts`` on CPU.

        ``prompt_threads`` 0 adapts to the batch: a lone prompt gets all the worker's threads (on
        a quiet 2-core CPU a hiera_l click's decoder took 39 ms on two, 67 ms on one:
        bench/decoder.py); several share them, one each before two for one (four clicks on two
        threads at once: 0.67x the time of one after another, where two threads on each click
        lose to their hand-offs between the decoder's small ops). A fixed ``prompt_threads``
        gives every prompt that many.
        """
        threads = torch.get_num_threads()
        if self.prompt_threads:
            each = min(self.prompt_threads, threads)
            width = self.parallel_prompts or max(1, threads // each)
        else:
            width = min(prompts, self.parallel_prompts or threads)
            each = max(1, threads // width)
        return min(width, prompts), each

    @functools.cached_property
    def decoders(self) -> ThreadPoolExecutor:
        """The threads that decode a batch's prompts at once on CPU, as many as
        :meth:`thread_plan` runs at once for the largest batch."""
        width, _ = self.thread_plan(sys.maxsize)
        return ThreadPoolExecutor(width, thread_name_prefix="sam2-decoder")

    def decode(self, emb: Embedding, multimask: bool, coords, labels, box, mask_input):
        """The prompt encoder and mask decoder on ``emb``'s image: (mask logits, iou, low-res
        logits), as the library's ``_predict`` answers them, by :class:`internals.PromptDecoder`
        for this kind of prompt: eager, or with ``trace_decoder`` traced at its first prompt. The
        image's share of the decoder's work is computed at its first prompt and kept with it."""
        kind = (coords is not None, box is not None, mask_input is not None, multimask)
        with self._tracing:
            decoder = self._decoders.get(kind)
            if decoder is None:
                decoder = self._decoders[kind] = internals.PromptDecoder(self.model, *kind).eval()
        if mask_input is None and emb.decoder_side is None:
            emb.decoder_side = decoder.image_side(emb.image_embed)
        side = () if mask_input is not None else emb.decoder_side
        prompt = tuple(t for t in (coords, labels, box, mask_input) if t is not None)
        inputs = (emb.image_embed, *emb.high_res_feats, *side, *prompt)
        if not self.trace_decoder:
            return decoder(*inputs)
        with self._tracing:
            if kind not in self._traced:
                self._traced[kind] = internals.traced_decoder(decoder, inputs)
        return self._traced[kind](*inputs)

    @contextlib.contextmanager
    def whole_image(self, key: str, image: np.ndarray, file: bytes | None = None):
        self._whole = (key, image, file)
        try:
            yield
        finally:
            self._whole = None


def load_sam2(
    entry: ModelEntry,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    cache_size: int = 16,
    prompt_threads: int = 0,
    parallel_prompts: int = 0,
    trace_decoder: bool = True,
) -> Sam2Predictor:
    """Build the configured variant and load its checkpoint (sam2's strict loader: a file that
    does not fit the architecture fails loudly). ``weights`` None downloads the released one.

    The model is sam2's ``SAM2VideoPredictor`` (a ``SAM2Base`` with the video builder's
    settings, which only its tracking methods read): the same parameters serve the image
    routes, through the returned predictor, and video sessions, through its ``model``.
    """
    install_cpu_connected_components()
    config, overrides = architecture(entry)
    build = {"device": str(device), "hydra_overrides_extra": overrides}
    if entry.is_random:
        model = build_sam2_video_predictor(config, None, **build)
    elif entry.weights:
        if not Path(entry.weights).is_file():
            raise FileNotFoundError(f"SAM 2 checkpoint for {entry.name} not found: {entry.weights}")
        model = build_sam2_video_predictor(config, entry.weights, **build)
    elif entry.arch_config is None:
        model = build_sam2_video_predictor_hf(hf_repo(entry), device=str(device))
    else:  # sam2's download, loaded into the configured architecture
        checkpoint = internals.hf_download(hf_repo(entry))
        model = build_sam2_video_predictor(config, checkpoint, **build)
    return Sam2Predictor(model, cache_size, dtype, prompt_threads, parallel_prompts, trace_decoder)


# ----------------------------------------------------------------------------- the two routes


@dataclass
class Prompt:
    point_coords: list[list[float]] | None = None
    point_labels: list[int] | None = None
    box: list[float] | None = None
    mask_input: np.ndarray | None = None  # (1, L, L) low-res logits
    multimask_output: bool = True
    return_logits: bool = False
    normalize_coords: bool = True
    mask_threshold: float = 0.0
    max_hole_area: float = 0.0
    max_sprinkle_area: float = 0.0
    best_only: bool = False


def upsample(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float32 logits -> (C, H, W) at the image's size, bilinear with half-pixel
    centres: the library's ``F.interpolate(align_corners=False)`` (to ~1e-4 of a logit), by
    OpenCV, which on CPU takes 0.3 ms for a 1024x768 mask where torch's kernel took 5 to 30."""
    h, w = hw
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in logits])


@dataclass
class Decoded:
    """One prompt's decoder output on its image, before upsampling."""

    emb: Embedding
    logits: torch.Tensor  # (1, C, L, L) mask logits
    iou: torch.Tensor  # (1, C)
    low: torch.Tensor  # (1, C, L, L) the logits clamped to +-32, as the library answers them


@torch.inference_mode()
def decode_prompts(
    pred: Sam2Predictor, embs: Sequence[Embedding | None], prompts: Sequence[Prompt]
) -> list[Decoded | None]:
    """The prompt encoder and mask decoder for each prompt on its image (None where the image is
    None), as ``SAM2ImagePredictor.predict`` runs them; on CPU several prompts at once
    (:meth:`Sam2Predictor.decoders`). The decoder only reads the predictor's batch of images."""
    todo = [k for k, emb in enumerate(embs) if emb is not None]
    out: list[Decoded | None] = [None] * len(embs)
    if not todo:
        return out
    images = [embs[k] for k in todo]
    internals.use_batch_features(
        pred, [e.image_embed for e in images], [e.high_res_feats for e in images], [e.orig_hw for e in images]
    )

    def decode(j: int) -> Decoded:
        if each:  # OpenMP's thread count is each thread's own: set where the prompt is decoded
            torch.set_num_threads(each)
        p = prompts[todo[j]]
        points = None if p.point_coords is None else np.asarray(p.point_coords, np.float32)
        labels = None if p.point_labels is None else np.asarray(p.point_labels, np.int32)
        box = None if p.box is None else np.asarray(p.box, np.float32)
        with torch.inference_mode(), pred.autocast():  # both are per thread
            mask_input, coords, labels, box = internals.prep_prompts(
                pred, points, labels, box, p.mask_input, p.normalize_coords, j
            )
            logits, iou, low = pred.decode(images[j], p.multimask_output, coords, labels, box, mask_input)
        return Decoded(images[j], logits, iou, low)

    width, each = pred.thread_plan(len(todo)) if pred.device.type == "cpu" else (1, 0)
    threads = torch.get_num_threads()
    try:
        if width > 1:
            decoded = list(pred.decoders.map(decode, range(len(todo))))
        else:
            decoded = [decode(j) for j in range(len(todo))]
    finally:
        torch.set_num_threads(threads)  # the decoding threads' settings reach torch's global count
    pred.reset_predictor()
    for k, d in zip(todo, decoded, strict=True):
        out[k] = d
    return out


@torch.inference_mode()
def prompt_masks(pred: Sam2Predictor, prompt: Prompt, dec: Decoded):
    """(masks (C, H, W), iou (C,) float32, low-res logits (C, L, L) float32) from a decoded
    prompt, as ``SAM2ImagePredictor.predict`` answers; masks are bool, or float32 logits with
    ``return_logits``. ``best_only`` keeps the one mask of highest predicted IoU (C = 1).

    Only the kept masks are upsampled to the image's size, on CPU by :func:`upsample` unless the
    answer carries logits or hole / sprinkle filling needs the library's ``postprocess_masks``,
    and the threshold gives bool masks, not float32 ones.
    """
    pred.configure(prompt.mask_threshold, prompt.max_hole_area, prompt.max_sprinkle_area)
    logits, iou, low = dec.logits, dec.iou, dec.low
    keep = slice(None)
    if prompt.best_only:
        best = int(torch.argmax(iou[0]))
        keep = slice(best, best + 1)
    exact = prompt.return_logits or prompt.max_hole_area > 0 or prompt.max_sprinkle_area > 0
    if logits.is_cuda or exact:
        masks = internals.postprocess_masks(pred, logits[:, keep], dec.emb.orig_hw)[0].cpu().numpy()
    else:
        masks = upsample(logits[0, keep].float().numpy(), dec.emb.orig_hw)
    if not prompt.return_logits:
        masks = masks > pred.mask_threshold
    return masks, iou[0, keep].float().cpu().numpy(), low[0, keep].float().cpu().numpy()


def predict_prompt(pred: Sam2Predictor, emb: Embedding, prompt: Prompt):
    """One prompt on one image: :func:`decode_prompts` then :func:`prompt_masks`."""
    dec = decode_prompts(pred, [emb], [prompt])[0]
    assert dec is not None
    return prompt_masks(pred, prompt, dec)


@torch.inference_mode()
def auto_masks(
    pred: Sam2Predictor,
    key: str,
    image: np.ndarray,
    settings: dict[str, Any],
    output_mode: str,
    file: bytes | None = None,
) -> list[dict]:
    """``SAM2AutomaticMaskGenerator.generate`` on the cached predictor (``key``: the image's id,
    ``file``: its file, cached with the embedding).

    ``min_mask_region_area`` drives the generator's hole/sprinkle filling (connected components,
    here on CPU too) and its final small-region removal, as in the library.
    """
    s = dict(settings)
    if s.get("point_grids") is not None:
        s["point_grids"] = [np.asarray(g, dtype=np.float64) for g in s["point_grids"]]
    amg = internals.mask_generator(pred.model, output_mode=output_mode, **s)
    pred.configure(0.0, s["min_mask_region_area"], s["min_mask_region_area"])
    amg.predictor = pred
    with pred.whole_image(key, image, file), pred.autocast():
        try:
            return amg.generate(image)
        except IndexError:
            # sam2 1.1.0 crashes ranking crops when no crop kept a mask (box_area of nothing)
            if amg.kept == 0:
                return []
            raise
