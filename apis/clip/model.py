"""CLIP maths: loading, MaskCLIP dense features, image and text embeddings, zero-shot labels,
similarity maps.

Plain functions on open_clip models and tensors, callable from tests and benchmarks without
a server.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from apis import open_clip_internals as internals
from apis.clip.options import SimilarityMode
from apis.core.cache import LRUCache
from apis.core.dense import interpolate_pos_embed
from apis.core.precision import Autocast
from apis.core.settings import ModelEntry

log = logging.getLogger(__name__)

#: Prompt embeddings /clip/classify keeps per model and worker (a few KB each): a label set
#: asked again costs no text-tower pass.
PROMPT_CACHE_SIZE = 4096

#: /clip/classify's prompt templates when a request names none: a selection from the 80 that
#: OpenAI's CLIP paper ensembled for ImageNet; each label's embedding is their normalised mean.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "art of the {}.",
    "itap of a {}.",
)


@dataclass
class ClipModel(Autocast):
    """A loaded CLIP model plus what the routes need to know about it."""

    model: Any  # open_clip.CLIP
    tokenizer: Any
    patch_size: int
    embed_dim: int
    device: torch.device
    dtype: torch.dtype  # compute dtype (autocast when not float32)
    preprocess: Any = None  # open_clip's eval transform: PIL image -> (3, S, S) for encode_image
    prompt_cache: LRUCache[torch.Tensor] = field(default_factory=lambda: LRUCache(PROMPT_CACHE_SIZE))

    @property
    def image_tokens(self) -> int:
        """Tokens the vision tower sees for one embedded image: the patch grid plus the class token."""
        gh, gw = self.model.visual.grid_size
        return gh * gw + 1


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
    if not internals.is_vision_transformer(visual) or not internals.standard_blocks(
        visual.transformer.resblocks
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
        preprocess=internals.eval_transform(open_clip.get_model_preprocess_cfg(model)),
    )


@torch.inference_mode()
def dense_features(cm: ClipModel, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP dense features, (B, H/p, W/p, D) float32, not normalised.

    Patch embedding, class token, positional embedding resized to the patch grid (the seed's
    scale-factor recipe, :func:`~apis.core.dense.interpolate_pos_embed`), ln_pre, every block but
    the last, then only the last block's value path (ln_1, value projection, out_proj: no
    attention mixing, residual or MLP), class token dropped, ln_post and the visual projection.
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
        for blk in blocks[:-1]:
            t = attention_block(blk, t)
        last = blocks[-1]
        attn = last.attn
        d = attn.embed_dim
        v = F.linear(last.ln_1(t), attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        v = attn.out_proj(v)[:, 1:]
        v = visual.ln_post(v) @ visual.proj
    return v.float().reshape(b, gh, gw, -1)


def attention_block(blk: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``blk(x)`` for an open_clip ``ResidualAttentionBlock`` on batch-first ``x`` (B, L, D).

    The same maths with the attention written out: ``nn.MultiheadAttention`` transposes its
    input to (L, B, D), and under CPU autocast the input projection of that non-contiguous
    tensor runs as a batched matmul that copies the weight once per position (70 of the 76 ms
    of a text layer at batch 32), which made bf16 batches slower than float32 ones.
    """
    attn = blk.attn
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    mask = None if attn_mask is None else attn_mask.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)
    x = x + blk.ls_1(attn.out_proj(o))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


#: Set (to anything) in a worker's environment, every text runs over all context positions: the
#: "before" side of bench/text_prefix.py, which measures what the deciding prefix saves.
FULL_CONTEXT_ENV = "VISIONSERVE_CLIP_TEXT_FULL_CONTEXT"


def _deciding_length(model: Any, tokens: torch.Tensor) -> int | None:
    """How many leading tokens decide the pooled text embedding, or None if all may.

    With a causal attention mask, token i only sees tokens <= i, so the embedding pooled at the
    end-of-text token is the same whether the context continues with padding or not. Prompts
    are short (a dozen tokens of CLIP's 77), so cutting the padding saves most of the work.
    """
    if (
        not isinstance(model, open_clip.CLIP)
        or getattr(model, "attn_mask", None) is None
        or not internals.standard_blocks(model.transformer.resblocks)
    ):
        return None
    if model.text_pool_type == "argmax":
        pooled_at = tokens.argmax(dim=-1)
    elif model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        pooled_at = (tokens == model.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    return int(pooled_at.max()) + 1


def _encode_text_prefix(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text`` on the first ``n`` context positions only (see _deciding_length)."""
    n = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
    mask = model.attn_mask[:n, :n]
    for blk in model.transformer.resblocks:
        x = attention_block(blk, x, mask)
    x = model.ln_final(x)
    x = internals.text_pool(x, tokens, model.text_pool_type, getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return (
        model.text_projection(x)
        if isinstance(model.text_projection, torch.nn.Linear)
        else x @ model.text_projection
    )


@torch.inference_mode()
def encode_texts(cm: ClipModel, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings (N, D), float32, in one forward pass over the context
    positions that matter (the batch's longest prompt, not all 77)."""
    tokens = cm.tokenizer(texts).to(cm.device)
    n = None if os.environ.get(FULL_CONTEXT_ENV) else _deciding_length(cm.model, tokens)
    with cm.autocast():
        emb = cm.model.encode_text(tokens) if n is None else _encode_text_prefix(cm.model, tokens[:, :n])
    return F.normalize(emb.float(), dim=-1)


@torch.inference_mode()
def encode_images(cm: ClipModel, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised ``encode_image`` of (B, 3, S, S) images made by ``cm.preprocess``: (B, D) float32."""
    with cm.autocast():
        emb = cm.model.encode_image(x.to(cm.device))
    return F.normalize(emb.float(), dim=-1)


def count_tokens(cm: ClipModel, texts: list[str]) -> list[int]:
    """Tokens the text tower reads for each text: start and end tokens included, cut at the
    context length as the tokenizer cuts the text."""
    tok = cm.tokenizer
    ctx = tok.context_length
    if isinstance(tok, open_clip.SimpleTokenizer):
        return [min(len(tok.encode(t)) + 2, ctx) for t in texts]
    pad = getattr(getattr(tok, "tokenizer", None), "pad_token_id", None)
    ids = tok(texts)
    return (ids != (0 if pad is None else pad)).sum(dim=-1).tolist()


def prompts(labels: list[str], templates: list[str]) -> list[str]:
    """Every template filled with every label, label-major (``{}`` stands for the label)."""
    return [t.replace("{}", label) for label in labels for t in templates]


def class_embeddings(prompt_emb: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(L, D) label embeddings from (L * T, D) normalised prompt embeddings (label-major): the
    mean over each label's templates, normalised again, as CLIP's zero-shot classifier builds them."""
    return F.normalize(prompt_emb.reshape(n_labels, -1, prompt_emb.shape[-1]).mean(dim=1), dim=-1)


def zero_shot_logits(cm: ClipModel, image_emb: torch.Tensor, labels_emb: torch.Tensor) -> torch.Tensor:
    """(L,) logits of one normalised image embedding against normalised label embeddings: cosine
    x the model's logit scale (its softmax is CLIP's zero-shot label probability)."""
    return cm.model.logit_scale.detach().float().exp().cpu() * (labels_emb @ image_emb)


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
