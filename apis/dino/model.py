"""DINOv2 maths: loading timm ViTs from hub names, dense facets at any stride, log-binning,
global embeddings.

Plain functions on timm models and tensors, callable from tests and benchmarks without a server.
The forward pass is written out (instead of timm's ``forward_features``) for three reasons:
the patch embedding may run at a stride below the patch size, the positional embedding must
be interpolated exactly as Meta's torch.hub model does it (so features equal what users got
before), and the key/query/value facets are read from inside a block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

from apis.core.precision import Autocast
from apis.core.settings import ModelEntry
from apis.dino.options import Facet

#: torch.hub names (what requests send as ``model_type``) -> timm architectures.
HUB_TO_TIMM = {
    f"dinov2_vit{size}14{reg}": f"vit_{arch}_patch14{'_reg4' if reg else ''}_dinov2.lvd142m"
    for size, arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for reg in ("", "_reg")
}

#: Log-binning with hierarchy 2: 1 + 8 * 2 cells per position.
BIN_CELLS = 17


@dataclass
class DinoModel(Autocast):
    """A loaded DINOv2 ViT plus what the routes need to know about it."""

    model: Any  # timm VisionTransformer
    patch_size: int
    embed_dim: int
    depth: int
    num_prefix: int  # class + register tokens, dropped from every output
    device: torch.device
    dtype: torch.dtype  # compute dtype (autocast when not float32)
    preprocess: Any = None  # timm's eval transform at the native size: PIL image -> (3, S, S)

    @property
    def registers(self) -> bool:
        return self.model.num_reg_tokens > 0

    @property
    def image_tokens(self) -> int:
        """Tokens the ViT sees for one embedded image: the native patch grid plus the prefix tokens."""
        gh, gw = self.model.patch_embed.grid_size
        return gh * gw + self.num_prefix


def architecture(entry: ModelEntry) -> tuple[str, dict[str, Any]]:
    """(timm name, keyword arguments) for a configured model.

    ``arch_config`` JSON (``{"architecture": "vit_small_patch14_dinov2", "depth": 2, ...}``)
    describes models without a hub name (the tiny test and demo models); otherwise the entry's
    name must be a torch.hub DINOv2 name.
    """
    if entry.arch_config is not None:
        spec = json.loads(Path(entry.arch_config).read_text())
        return spec.pop("architecture"), spec
    hub = entry.name.strip().lower().replace("-", "_")
    if hub not in HUB_TO_TIMM:
        raise ValueError(
            f"unknown DINOv2 model {entry.name!r}: use a torch.hub name ({', '.join(HUB_TO_TIMM)}) "
            "or give an arch_config"
        )
    return HUB_TO_TIMM[hub], {}


def load_dino(entry: ModelEntry, device: str | torch.device, dtype: torch.dtype = torch.float32) -> DinoModel:
    """Build the timm architecture of ``entry`` and load its weights.

    ``entry.weights``: 'random', a local file (Meta's torch.hub ``.pth`` or a timm state dict:
    timm converts the former), or None to let timm download the released weights.
    """
    name, kwargs = architecture(entry)
    if entry.is_random:
        pretrained, overlay = False, None
    elif entry.weights:
        if not Path(entry.weights).is_file():
            raise FileNotFoundError(f"DINOv2 weights for {entry.name} not found: {entry.weights}")
        pretrained, overlay = True, {"file": entry.weights}
    else:
        pretrained, overlay = True, None
    model = timm.create_model(
        name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
    )
    model.eval().to(device)
    attn = model.blocks[0].attn
    if not isinstance(getattr(attn, "qkv", None), torch.nn.Linear) or not all(
        isinstance(getattr(attn, n, torch.nn.Identity()), torch.nn.Identity) for n in ("q_norm", "k_norm")
    ):
        raise ValueError(f"{entry.name}: facets need a ViT with a fused qkv projection and no q/k norm")
    return DinoModel(
        model=model,
        patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_prefix=model.num_prefix_tokens,
        device=torch.device(device),
        dtype=dtype,
        preprocess=eval_transform(model),
    )


def eval_transform(model: Any) -> Any:
    """timm's evaluation transform for the model's data config (for DINOv2: bicubic resize of
    the shorter side, centre crop, ImageNet mean/std) at the model's own input size, which the
    config states for the released models and the tiny test ones lack."""
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, *model.patch_embed.img_size)
    return timm.data.create_transform(**cfg, is_training=False)


@torch.inference_mode()
def global_embeddings(dm: DinoModel, x: torch.Tensor) -> torch.Tensor:
    """(B, 2, D) float32 embeddings of (B, 3, S, S) images made by ``dm.preprocess``, both
    poolings (``POOLINGS`` order) of one timm ``forward_features`` (blocks, then the final norm):
    the class token (what timm's ``forward_head(pre_logits=True)`` returns for DINOv2) and the
    mean of the patch tokens (timm's ``avg`` pooling: class and register tokens left out)."""
    with dm.autocast():
        t = dm.model.forward_features(x.to(dm.device))
    t = t.float()
    return torch.stack([t[:, 0], t[:, dm.num_prefix :].mean(dim=1)], dim=1)


def grid_pos_embed(dm: DinoModel, grid: tuple[int, int]) -> torch.Tensor:
    """Positional embedding of a (gh, gw) patch grid, (1, gh*gw, D), as the torch.hub model computes it.

    Hub models without registers resize by a scale factor of (g + 0.1) / M without
    antialiasing; register models resize to the exact size with antialiasing (which timm does
    for both). At the native grid the table is used as is.
    """
    m = dm.model
    pos = m.pos_embed[:, 0 if m.no_embed_class else m.num_prefix_tokens :]
    native = tuple(m.patch_embed.grid_size)
    if tuple(grid) == native:
        return pos
    table = pos.float().reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
    if dm.registers:
        out = F.interpolate(table, size=grid, mode="bicubic", antialias=True)
    else:
        scale = ((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1])
        out = F.interpolate(table, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"positional embedding resized to {tuple(out.shape[-2:])}, wanted {grid}")
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)


def prefix_tokens(dm: DinoModel) -> torch.Tensor:
    """(1, num_prefix, D): the class token with its position, then the register tokens (none)."""
    m = dm.model
    cls = m.cls_token if m.no_embed_class else m.cls_token + m.pos_embed[:, :1]
    return torch.cat([cls, m.reg_token], dim=1) if m.reg_token is not None else cls


@torch.inference_mode()
def dense_features(dm: DinoModel, x: torch.Tensor, stride: int, facet: Facet, layer: int) -> torch.Tensor:
    """Facet of block ``layer`` for every patch, (B, gh, gw, D) float32, prefix tokens dropped.

    ``x`` (B, 3, H, W) is normalised with both sides multiples of the patch size; the grid is
    ``1 + (H - patch) // stride`` by ``1 + (W - patch) // stride``. ``token`` is the block's
    output (before the final norm); ``key``/``query``/``value`` come from its qkv projection of
    the normed input, channels in the seed's order (:func:`seed_channel_order`).
    """
    m = dm.model
    layer = layer % dm.depth
    with dm.autocast():
        proj = m.patch_embed.proj
        t = F.conv2d(x.to(dm.device), proj.weight, proj.bias, stride=stride)
        b, d, gh, gw = t.shape
        t = t.flatten(2).transpose(1, 2) + grid_pos_embed(dm, (gh, gw)).to(t.dtype)
        t = torch.cat([prefix_tokens(dm).to(t.dtype).expand(b, -1, -1), t], dim=1)
        t = m.norm_pre(t)
        for blk in m.blocks[:layer]:
            t = blk(t)
        blk = m.blocks[layer]
        if facet == "token":
            t = blk(t)
        else:
            i = ("query", "key", "value").index(facet)
            t = seed_channel_order(blk.attn.qkv(blk.norm1(t))[..., i * d : (i + 1) * d], blk.attn.num_heads)
    return t[:, dm.num_prefix :].float().reshape(b, gh, gw, d)


def seed_channel_order(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., heads * head_dim) with head h's channel d at h * head_dim + d -> at d * heads + h.

    The seed's extractor (dino-vit-features) views q/k/v as (B, heads, tokens, head_dim) and
    flattens each token head_dim-major; probes and indexes built on its features expect that.
    """
    return x.unflatten(-1, (heads, -1)).transpose(-1, -2).flatten(-2)


def log_bin(feats: torch.Tensor) -> torch.Tensor:
    """Log-binned descriptors, hierarchy 2: (B, h, w, D) -> (B, h, w, 17 * D).

    Level 0 takes the 3x3 neighbourhood of single cells; level 1 the 8 surrounding 3x3-averaged
    cells at offsets of 3 (the centre is level 0's). Averages ignore positions outside the grid;
    neighbours outside it repeat the nearest edge cell. Channel blocks follow the offsets row
    by row, level 0 first.
    """
    x = feats.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    cells = []
    for level in range(2):
        k = 3**level
        pooled = x if k == 1 else F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        padded = F.pad(pooled, (k, k, k, k), mode="replicate")
        for dy in (-k, 0, k):
            for dx in (-k, 0, k):
                if level and dy == 0 and dx == 0:
                    continue
                cells.append(padded[:, :, k + dy : k + dy + h, k + dx : k + dx + w])
    return torch.cat(cells, dim=1).permute(0, 2, 3, 1)
