"""SAM 3 maths: build and load the image model, cache encoded images, turn prompts into instances.

Plain functions and classes on sam3's own modules, callable from tests and benchmarks without a
server. The model runs through sam3's ``Sam3Processor`` preprocessing and
``Sam3Image.forward_grounding``; what is ours:

* one builder for every size (:class:`Sam3Arch`; its defaults are the released model, so real
  checkpoints load, and tests build a tiny model from the same classes);
* a checkpoint loader that refuses a file that does not fit (sam3 loads with ``strict=False``);
* an LRU cache of encoded images, so a new prompt on a known image skips the vision backbone;
* find-queries (a text, exemplar boxes, or both) of several requests, on one or several cached
  images, in one detector forward, and new texts through the text encoder as one batch;
* post-processing one instance at a time (the processor upsamples every kept mask at once, which
  for a low threshold on a large image would need gigabytes), plus polygons, areas and
  mask encodings.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from sam3.model import box_ops
from sam3.model.data_misc import FindStage, interpolate
from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import Prompt, SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from sam3.model.sam3_image_processor import Sam3Processor
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone

from apis.core import withdrawal
from apis.core.cache import LRUCache
from apis.core.encodings import coco_rle, largest_polygon, png_base64
from apis.core.precision import Autocast
from apis.core.settings import ModelEntry
from apis.sam3 import internals

# ----------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Sam3Arch:
    """Sizes of a SAM 3 image model. The defaults are the released ``facebook/sam3`` detector
    (sam3's ``model_builder``); an ``arch_config`` JSON overrides some of them."""

    resolution: int = 1008
    pretrain_img_size: int = 336
    patch_size: int = 14
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.625
    window_size: int = 24
    global_att_blocks: tuple[int, ...] = (7, 15, 23, 31)
    d_model: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200
    geometry_layers: int = 3
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24

    @classmethod
    def from_json(cls, path: str | Path) -> Sam3Arch:
        spec = json.loads(Path(path).read_text())
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown SAM 3 architecture fields {sorted(unknown)}")
        if "global_att_blocks" in spec:
            spec["global_att_blocks"] = tuple(spec["global_att_blocks"])
        return cls(**spec)


@dataclass(frozen=True)
class Sam3VideoArch(Sam3Arch):
    """Sizes of a SAM 3 video model: the detector's (:class:`Sam3Arch`) and the tracker's. The
    defaults are sam3's ``build_sam3_video_model``. One ``arch_config`` serves both models: the
    image routes build the detector from it, video sessions add the tracker (apis/sam3/video.py)."""

    mem_dim: int = 64
    tracker_layers: int = 4
    tracker_ffn_dim: int = 2048
    num_maskmem: int = 7
    # sam3's ``apply_temporal_disambiguation``: hold outputs back ``hotstart_delay`` frames to drop
    # instances that were never matched or duplicated, and recondition every 16th frame
    temporal_disambiguation: bool = True


def _attention(arch: Sam3Arch, dropout: float = 0.1, **kwargs) -> MultiheadAttention:
    return MultiheadAttention(num_heads=arch.heads, dropout=dropout, embed_dim=arch.d_model, **kwargs)


def _position_encoding(arch: Sam3Arch, precompute: int | None = None) -> PositionEmbeddingSine:
    return PositionEmbeddingSine(
        num_pos_feats=arch.d_model,
        normalize=True,
        scale=None,
        temperature=10000,
        precompute_resolution=precompute,
    )


def dot_product_scoring(arch: Sam3Arch) -> DotProductScoring:
    """The detector's query scorer at ``arch``'s sizes (the image and the video builders' alike)."""
    d = arch.d_model
    return DotProductScoring(
        d_model=d,
        d_proj=d,
        prompt_mlp=MLP(
            input_dim=d,
            hidden_dim=arch.ffn_dim,
            output_dim=d,
            num_layers=2,
            dropout=0.1,
            residual=True,
            out_norm=torch.nn.LayerNorm(d),
        ),
    )


def build_sam3_image(arch: Sam3Arch, bpe_path: str | None = None) -> Sam3Image:
    """A ``Sam3Image`` with random weights, built module by module as sam3's ``model_builder``
    does (same classes and arguments) but with ``arch``'s sizes. No interactive (SAM 1 task)
    head: the text-prompt route does not use it."""
    return Sam3Image(
        **detector_modules(arch, bpe_path),
        num_feature_levels=1,
        o2m_mask_predict=True,
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
        matcher=None,
    )


def detector_modules(
    arch: Sam3Arch, bpe_path: str | None = None, tracker_neck: bool = False
) -> dict[str, Any]:
    """The detector's parts as sam3's ``model_builder`` makes them, with ``arch``'s sizes: the
    image model's and the video model's detectors share them. ``tracker_neck`` adds the neck's
    second set of convolutions whose features feed the video tracker (sam3's ``add_sam2_neck``)."""
    internals.install()
    d = arch.d_model
    vit = ViT(
        img_size=arch.resolution,
        pretrain_img_size=arch.pretrain_img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.vit_dim,
        depth=arch.vit_depth,
        num_heads=arch.vit_heads,
        mlp_ratio=arch.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=arch.global_att_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=arch.window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    neck = Sam3DualViTDetNeck(
        position_encoding=_position_encoding(arch, precompute=arch.resolution),
        d_model=d,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=vit,
        add_sam2_neck=tracker_neck,
    )
    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=bpe_path or internals.bpe_path()),
        d_model=d,
        width=arch.text_width,
        heads=arch.text_heads,
        layers=arch.text_layers,
    )
    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)
    encoder = TransformerEncoderFusion(
        layer=TransformerEncoderLayer(
            activation="relu",
            d_model=d,
            dim_feedforward=arch.ffn_dim,
            dropout=0.1,
            pos_enc_at_attn=True,
            pos_enc_at_cross_attn_keys=False,
            pos_enc_at_cross_attn_queries=False,
            pre_norm=True,
            self_attention=_attention(arch, batch_first=True),
            cross_attention=_attention(arch, batch_first=True),
        ),
        num_layers=arch.encoder_layers,
        d_model=d,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(
            activation="relu",
            d_model=d,
            dim_feedforward=arch.ffn_dim,
            dropout=0.1,
            cross_attention=_attention(arch),
            n_heads=arch.heads,
            use_text_cross_attention=True,
        ),
        num_layers=arch.decoder_layers,
        num_queries=arch.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=d,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=arch.resolution,
        stride=arch.patch_size,
        use_act_checkpoint=True,
        presence_token=True,
    )
    scoring = dot_product_scoring(arch)
    segmentation = UniversalSegmentationHead(
        hidden_dim=d,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_attention(arch, dropout=0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d),
    )
    geometry_layer = TransformerEncoderLayer(
        activation="relu",
        d_model=d,
        dim_feedforward=arch.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=_attention(arch, batch_first=False),
        pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
        cross_attention=_attention(arch, batch_first=False),
    )
    geometry = SequenceGeometryEncoder(
        pos_enc=_position_encoding(arch),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=d,
        num_layers=arch.geometry_layers,
        layer=geometry_layer,
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )
    return {
        "backbone": backbone,
        "transformer": TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
        "input_geometry_encoder": geometry,
        "segmentation_head": segmentation,
        "dot_prod_scoring": scoring,
    }


TRACKER_NECK = "backbone.vision_backbone.sam2_convs."


def load_checkpoint(model: Sam3Image, path: str | Path) -> None:
    """Load a SAM 3 checkpoint (the released ``sam3.pt`` with ``detector.``/``tracker.`` keys, or a
    plain ``Sam3Image`` state dict) and fail when it does not fit: sam3 itself loads with
    ``strict=False`` and would serve a model with no weights loaded."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith("detector.") for k in state):
        state = {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}
    # the neck's second set of convolutions feeds only the video tracker (apis/sam3/video.py)
    state = {k: v for k, v in state.items() if not k.startswith(TRACKER_NECK)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"SAM 3 checkpoint {path} does not fit the configured architecture: {e}") from None
    if missing or unexpected:
        raise ValueError(
            f"SAM 3 checkpoint {path} does not fit the configured architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def download_released() -> str:
    from sam3.model_builder import download_ckpt_from_hf

    return download_ckpt_from_hf()


def load_sam3(
    entry: ModelEntry, device: str | torch.device, dtype: torch.dtype = torch.float32, cache_size: int = 8
) -> Sam3Runner:
    """Build the configured model and load its weights: ``random``, a local checkpoint file, or
    (``weights`` null) sam3's own download of ``facebook/sam3``."""
    arch = Sam3VideoArch.from_json(entry.arch_config) if entry.arch_config is not None else Sam3VideoArch()
    model = build_sam3_image(arch)
    if entry.is_random:
        internals.init_untrained(model)
    else:
        if entry.weights:
            path = entry.weights
            if not Path(path).is_file():
                raise FileNotFoundError(f"SAM 3 checkpoint for {entry.name} not found: {path}")
        else:  # facebook/sam3's file, into the configured architecture (the released one by default)
            path = download_released()
        load_checkpoint(model, path)
    device = torch.device(device)
    model = model.to(device).eval()
    internals.move_caches(model, device)
    return Sam3Runner(model, arch, device, dtype, cache_size, entry)


# ----------------------------------------------------------------------------- encoding and prompts


@dataclass
class Encoded:
    """One image after the vision backbone: its feature pyramid and original size. The position
    encodings are the same for every image (all are resized to the model's resolution), so the
    runner keeps one copy instead of one per cached image."""

    backbone_fpn: list[torch.Tensor]  # (1, C, h, w) per level
    height: int
    width: int


# sam3's processor gives a boxes-only query this text (``Sam3Processor.add_geometric_prompt``)
VISUAL_TEXT = "visual"


@dataclass
class Query:
    """One find-query of the detector: a text, exemplar boxes, or both, on one encoded image."""

    enc: Encoded
    text: str | None  # None: boxes only
    boxes: list[list[float]] = field(default_factory=list)  # [x1, y1, x2, y2] in pixels
    labels: list[bool] = field(default_factory=list)  # per box: True = positive exemplar
    score_threshold: float = 0.0  # detections at or below it are dropped as soon as they are made


@dataclass
class Detections:
    """Every query's answer to one find-query, before any threshold."""

    scores: torch.Tensor  # (Q,) sigmoid(logit) x sigmoid(presence), as Sam3Processor scores them
    boxes: torch.Tensor  # (Q, 4) cx, cy, w, h in [0, 1]
    mask_logits: torch.Tensor  # (Q, h, w) low resolution

    def above(self, threshold: float) -> Detections:
        """Only the queries scoring above ``threshold`` (copies, so the batch's tensors can go)."""
        keep = torch.nonzero(self.scores > threshold).flatten()
        return Detections(
            scores=self.scores[keep], boxes=self.boxes[keep], mask_logits=self.mask_logits[keep]
        )


class Sam3Runner(Autocast):
    """A SAM 3 image model with its processor, an LRU of encoded images and one of encoded prompts.

    ``encoded_images`` counts the images the vision backbone actually processed and
    ``encoded_prompts`` the texts the text encoder did; ``encoder_batches``, ``text_batches`` and
    ``detector_batches`` count the image-encoder (trunk), text-encoder and detector forwards by
    their batch size.
    """

    def __init__(
        self,
        model: Sam3Image,
        arch: Sam3Arch,
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int,
        entry: ModelEntry | None = None,
    ):
        self.model = model
        self.arch = arch
        self.entry = entry  # where the weights came from: video sessions load the tracker's from it
        self.video: Any = None  # the video model on this detector, made for the first session
        self.device = device
        self.dtype = dtype
        self.processor = Sam3Processor(model, resolution=arch.resolution, device=str(device))
        self.cache: LRUCache[Encoded] = LRUCache(cache_size)
        self.text_cache: LRUCache[dict[str, torch.Tensor]] = LRUCache(256)
        self.encoded_images = 0
        self.encoded_prompts = 0
        self.text_batches: Counter[int] = Counter()
        self.detector_batches: Counter[int] = Counter()
        self.encoder_batches: Counter[int] = Counter()
        model.backbone.vision_backbone.trunk.register_forward_hook(self._count)
        self._pos_enc: list[torch.Tensor] | None = None

    def _count(self, _module, inputs, _output) -> None:
        self.encoder_batches[len(inputs[0])] += 1

    @torch.inference_mode()
    def encode(self, keys: Sequence[str], images: Sequence[np.ndarray | None]) -> list[Encoded | None]:
        """Encoded HWC uint8 images by cache key (their image_id): cached ones reused, the others
        through the backbone as one batch; a key given without an image is only looked up (None
        if not cached)."""

        def encode(todo: list[int]) -> list[Encoded]:
            with self.autocast():
                state = self.processor.set_image_batch([Image.fromarray(images[i]) for i in todo])
            out = state["backbone_out"]
            self.encoded_images += len(todo)
            if self._pos_enc is None:
                self._pos_enc = [p[:1].clone() for p in out["vision_pos_enc"]]
            return [
                Encoded(  # copies, so an evicted entry frees its memory
                    backbone_fpn=[f[j : j + 1].clone() for f in out["backbone_fpn"]],
                    height=images[i].shape[0],
                    width=images[i].shape[1],
                )
                for j, i in enumerate(todo)
            ]

        return self.cache.fetch_or_find(keys, images, encode)

    def texts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """The text encoder's outputs per prompt: cached ones reused (pipelines repeat their
        prompts), the new ones through the encoder as one batch. The tokenizer pads every text
        to the same context length, so a batch is the same work per text as one alone."""

        def encode(todo: list[int]) -> list[dict[str, torch.Tensor]]:
            with self.autocast():
                out = self.model.backbone.forward_text([prompts[i] for i in todo], device=self.device)
            self.encoded_prompts += len(todo)
            self.text_batches[len(todo)] += 1
            return [  # copies, so an evicted entry frees its memory
                {
                    "language_features": out["language_features"][:, j : j + 1].clone(),
                    "language_mask": out["language_mask"][j : j + 1].clone(),
                }
                for j in range(len(todo))
            ]

        return self.text_cache.fetch(prompts, encode)

    @torch.inference_mode()
    def detect(self, queries: Sequence[Query], chunk: int) -> list[Detections]:
        """Every query's detections above its score threshold, ``chunk`` queries per detector
        forward. A query is one find-query of ``Sam3Image.forward_grounding`` (its
        ``img_ids``/``text_ids``), so queries on the same or different cached images, with or
        without boxes, share one forward; the answers are those of one query at a time."""
        texts = self.texts([q.text or VISUAL_TEXT for q in queries])
        out: list[Detections] = []
        for start in range(0, len(queries), chunk):
            withdrawal.check()  # stop between chunks once every request served here was withdrawn
            out += self._forward(queries[start : start + chunk], texts[start : start + chunk])
        return out

    def _forward(self, queries: Sequence[Query], texts: list[dict[str, torch.Tensor]]) -> list[Detections]:
        """One detector forward over ``queries`` (``Sam3Processor._forward_grounding`` without its
        threshold and upsampling)."""
        n = len(queries)
        images = list({id(q.enc): q.enc for q in queries}.values())
        slot = {id(enc): i for i, enc in enumerate(images)}
        if len(images) == 1:
            fpn = images[0].backbone_fpn
        else:
            fpn = [torch.cat(level) for level in zip(*(enc.backbone_fpn for enc in images), strict=True)]
        pos = [p.expand(len(images), *p.shape[1:]) for p in self._pos_enc]
        backbone_out = {
            "vision_features": fpn[-1],
            "vision_pos_enc": pos,
            "backbone_fpn": fpn,
            "sam2_backbone_out": None,
            "language_features": torch.cat([t["language_features"] for t in texts], dim=1),
            "language_mask": torch.cat([t["language_mask"] for t in texts]),
        }
        find = FindStage(
            img_ids=torch.tensor([slot[id(q.enc)] for q in queries], device=self.device, dtype=torch.long),
            text_ids=torch.arange(n, device=self.device, dtype=torch.long),
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        self.detector_batches[n] += 1
        with self.autocast():
            res = self.model.forward_grounding(
                backbone_out=backbone_out,
                find_input=find,
                geometric_prompt=self._geometry(queries),
                find_target=None,
            )
        presence = res["presence_logit_dec"].float().sigmoid().unsqueeze(1)
        scores = (res["pred_logits"].float().sigmoid() * presence).squeeze(-1)
        boxes = res["pred_boxes"].float()
        return [
            Detections(scores=scores[i], boxes=boxes[i], mask_logits=res["pred_masks"][i]).above(
                q.score_threshold
            )
            for i, q in enumerate(queries)
        ]

    def _geometry(self, queries: Sequence[Query]) -> Prompt:
        """The queries' boxes as one right-padded ``Prompt``: normalised (cx, cy, w, h) as
        ``Sam3Processor.add_geometric_prompt`` takes them, padding masked out of every attention."""
        n = len(queries)
        most = max(len(q.boxes) for q in queries)
        if most == 0:
            return internals.dummy_prompt(self.model, n)
        boxes = torch.zeros(most, n, 4, device=self.device)
        labels = torch.zeros(most, n, device=self.device, dtype=torch.bool)
        padding = torch.ones(n, most, device=self.device, dtype=torch.bool)
        for i, q in enumerate(queries):
            if q.boxes:
                boxes[: len(q.boxes), i] = torch.tensor(
                    [normalized_cxcywh(b, q.enc.width, q.enc.height) for b in q.boxes], dtype=torch.float32
                )
                labels[: len(q.boxes), i] = torch.tensor(q.labels, dtype=torch.bool)
                padding[i, : len(q.boxes)] = False
        return Prompt(box_embeddings=boxes, box_mask=padding, box_labels=labels)


def normalized_cxcywh(box: Sequence[float], width: int, height: int) -> list[float]:
    """A pixel [x1, y1, x2, y2] box as the normalised [cx, cy, w, h] that sam3's geometry encoder takes."""
    x1, y1, x2, y2 = box
    return [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]


# ----------------------------------------------------------------------------- instances


@dataclass
class Filters:
    """What an instance must pass to be returned (the seed service's defaults)."""

    score_threshold: float = 0.5  # kept when score > threshold (as Sam3Processor)
    epsilon_factor: float = 0.02  # polygon simplification, x the contour's perimeter
    min_area: float = 100  # kept when the polygon's area >= min_area
    return_masks: bool = False
    mask_format: Literal["rle", "png"] = "rle"
    max_instances: int | None = None  # per query, best score first; None keeps all


def instance_mask(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """One query's (h, w) low-res logits -> (H, W) bool mask at the image's size, as
    ``Sam3Processor``: bilinear upsampling, sigmoid, > 0.5."""
    up = interpolate(logits[None, None].float(), (height, width), mode="bilinear", align_corners=False)
    return (up.sigmoid() > 0.5)[0, 0].cpu().numpy()


def instances(det: Detections, height: int, width: int, prompt: str | None, filters: Filters) -> list[dict]:
    """The query's instances, best score first, at most ``filters.max_instances``. Per
    instance: score, bbox [x1, y1, x2, y2] in pixels (clipped to the image), polygon of the
    largest external contour, area = mask pixel count, and the mask when asked for. An empty
    mask has no outline and is never returned.

    Masks are upsampled one at a time, so memory stays one image-sized mask whatever the count.
    """
    keep = torch.nonzero(det.scores > filters.score_threshold).flatten()
    keep = keep[torch.argsort(det.scores[keep], descending=True, stable=True)]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=det.boxes.device)
    boxes = box_ops.box_cxcywh_to_xyxy(det.boxes[keep]) * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    out = []
    for q, box in zip(keep.tolist(), boxes.tolist(), strict=True):
        if len(out) == filters.max_instances:  # the rest would be upsampled and outlined for nothing
            break
        mask = instance_mask(det.mask_logits[q], height, width)
        outline = largest_polygon(mask, filters.epsilon_factor)
        if outline is None or outline[1] < filters.min_area:
            continue
        item: dict[str, Any] = {
            "prompt": prompt,
            "score": float(det.scores[q]),
            "bbox": [float(v) for v in box],
            "polygon": outline[0],
            "area": int(mask.sum()),
        }
        if filters.return_masks:
            data = coco_rle(mask) if filters.mask_format == "rle" else png_base64(mask)
            item["mask"] = {"data": data, "format": filters.mask_format, "shape": [height, width]}
        out.append(item)
    return out


def make_queries(
    enc: Encoded,
    prompts: list[str] | None,
    boxes: list[list[float]],
    labels: list[bool],
    filters: Filters,
) -> list[Query]:
    """A request's find-queries on its encoded image: one per text prompt, each with all the
    exemplar boxes (sam3's processor combines its text with every box added to it), or one
    boxes-only query when there is no text."""
    return [Query(enc, text, boxes, labels, filters.score_threshold) for text in (prompts or [None])]


def results(queries: list[Query], dets: list[Detections], filters: Filters) -> list[dict]:
    """The instances of every query, in query order (:func:`instances`)."""
    return [
        inst
        for q, det in zip(queries, dets, strict=True)
        for inst in instances(det, q.enc.height, q.enc.width, q.text, filters)
    ]


def mask_bytes(results: list[dict]) -> int:
    """Characters the instances' masks add to a response."""
    data = [r["mask"]["data"] for r in results if "mask" in r]
    return sum(len(d) if isinstance(d, str) else len(d["counts"]) for d in data)
