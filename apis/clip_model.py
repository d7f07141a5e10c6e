"""CLIP maths: loading, MaskCLIP dense features, text embeddings, similarity maps.

Plain functions on open_clip models and tensors, callable from tests and benchmarks without
a server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F

from .config import ModelEntry
from .dense import interpolate_pos_embed
from .precision import Autocast

log = logging.getLogger(__name__)

SimilarityMode = Literal["dot", "cosine"]


@dataclass
class ClipModel(Autocast):
    """A loaded CLIP model plus what the routes need to know about it."""

    model: Any  # open_clip.CLIP
    tokenizer: Any
    patch_size: int
    embed_dim: int
    device: torch.device
    dtype: torch.dtype  # compute dtype (autocast when not float32)


def load_clip(entry: ModelEntry, device: str | torch.device, dtype: torch.dtype = torch.float32) -> ClipModel:
    """Build the open_clip architecture named by ``entry`` and load its weights.

    ``entry.weights``: 'random' (no weights), a local checkpoint file, or None to let open_clip
    download ``entry.pretrained``. ``entry.arch_config`` registers a JSON architecture first.
    """
    if entry.arch_config is not None:
        open_clip.add_model_config(Path(entry.arch_config))
    if entry.is_random:
        pretrained = None
    elif entry.weights:
        if not Path(entry.weights).is_file():
            raise FileNotFoundError(f"CLIP weights for {entry.name} not found: {entry.weights}")
        pretrained = entry.weights
    else:
        pretrained = entry.pretrained
    model = open_clip.create_model(entry.name, pretrained=pretrained, device=device)
    model.eval()
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or not all(
        isinstance(b.attn, torch.nn.MultiheadAttention) for b in visual.transformer.resblocks
    ):
        raise ValueError(
            f"{entry.name}: dense features need an open_clip VisionTransformer with standard attention"
        )
    if visual.attn_pool is not None:
        raise ValueError(f"{entry.name}: attention-pooled vision towers are not supported for dense features")
    return ClipModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(entry.name),
        patch_size=visual.patch_size[0],
        embed_dim=visual.output_dim,
        device=torch.device(device),
        dtype=dtype,
    )


@torch.inference_mode()
def dense_features(cm: ClipModel, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP dense features, (B, H/p, W/p, D) float32, not normalised.

    Patch embedding, class token, positional embedding resized (bicubic) to the patch grid,
    ln_pre, every block but the last, then only the last block's value path (ln_1, value
    projection, out_proj: no attention mixing, residual or MLP), class token dropped, ln_post
    and the visual projection.
    """
    visual = cm.model.visual
    with cm.autocast():
        t = visual.conv1(x.to(cm.device))
        b, _, gh, gw = t.shape
        t = t.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(b, -1, -1)
        pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, (gh, gw))
        t = visual.ln_pre(torch.cat([cls, t], dim=1) + pos.to(t.dtype))
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)
        for blk in blocks[:-1]:
            t = blk(t)
        if not batch_first:
            t = t.transpose(0, 1)
        last = blocks[-1]
        attn = last.attn
        d = attn.embed_dim
        v = F.linear(last.ln_1(t), attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        v = attn.out_proj(v)[:, 1:]
        v = visual.ln_post(v) @ visual.proj
    return v.float().reshape(b, gh, gw, -1)


@torch.inference_mode()
def encode_texts(cm: ClipModel, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings (N, D), float32, in one forward pass."""
    tokens = cm.tokenizer(texts).to(cm.device)
    with cm.autocast():
        emb = cm.model.encode_text(tokens)
    return F.normalize(emb.float(), dim=-1)


def similarity(feats: torch.Tensor, text: torch.Tensor, mode: SimilarityMode) -> torch.Tensor:
    """(h, w) score of each position of (h, w, D) features against a normalised (D,) text vector."""
    if mode == "cosine":
        feats = F.normalize(feats, dim=-1)
    return feats @ text


def spatial_softmax(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``sim * temperature`` over every position (max-subtracted: no overflow)."""
    return torch.softmax(sim.flatten() * temperature, dim=0).reshape(sim.shape)


def relevancy(feats: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float):
    """LERF relevancy in [0, 1]: min over negatives of softmax([pos, neg] cosine x temperature)[pos]."""
    f = F.normalize(feats, dim=-1)
    pos = f @ positive  # (h, w)
    neg = f @ negatives.T  # (h, w, K)
    pair = torch.stack([pos.unsqueeze(-1).expand_as(neg), neg], dim=-1) * temperature
    return torch.softmax(pair, dim=-1)[..., 0].amin(dim=-1)
