"""Dense-feature plumbing shared by CLIP and DINO: resize, pad, PCA, upsample, layout.

Plain functions on PIL images and torch tensors, plus the two steps every dense route takes
around its model: :func:`plan` (check a request against the image and limits before any pixel
is computed) and :func:`respond` (PCA, upsampling, layout and encoding of the patch grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from apis.core.encodings import (
    InterpolationMode,
    PaddingMode,
    TensorFormat,
    check_response_size,
    tensor_answer,
)
from apis.core.errors import APIError
from apis.core.settings import Limits

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(width: int, height: int, load_size: int | None) -> tuple[int, int]:
    """Size after the seed's ``load_size`` rule.

    > 0: the shorter side becomes ``load_size`` (aspect kept, the longer side truncated like
    torchvision's ``Resize(int)``); < 0: the shorter side becomes ``|load_size|`` times itself;
    None: unchanged.
    """
    if load_size is None:
        return width, height
    short, long = min(width, height), max(width, height)
    new_short = load_size if load_size > 0 else -load_size * short
    new_long = int(new_short * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_and_crop(img: Image.Image, load_size: int | None, center_crop: bool) -> Image.Image:
    """Resize (bicubic) by the ``load_size`` rule, then optionally centre-crop a square.

    The crop side is the shorter side after resizing, which equals ``load_size`` when it is
    positive.
    """
    w, h = resized_size(*img.size, load_size)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    if center_crop:
        side = min(w, h)
        left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
        img = img.crop((left, top, left + side, top + side))
    return img


def preprocess(
    img: Image.Image,
    load_size: int | None,
    center_crop: bool,
    patch: int,
    padding_mode: PaddingMode,
    mean: tuple,
    std: tuple,
) -> torch.Tensor:
    """Resize/crop, normalise and pad to a multiple of ``patch``: (1, 3, Hp, Wp) float32."""
    img = resize_and_crop(img, load_size, center_crop)
    return pad_to_multiple(to_tensor(img, mean, std), patch, padding_mode)


def to_tensor(img: Image.Image, mean: tuple, std: tuple) -> torch.Tensor:
    """(1, 3, H, W) float32, normalised."""
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    x = x.permute(2, 0, 1).float().div_(255.0)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: PaddingMode) -> torch.Tensor:
    """Pad bottom and right so H and W are multiples of ``multiple`` (constant pads with 0)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode=mode) if mode != "constant" else F.pad(x, (0, pw, 0, ph), value=0.0)


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return height + (-height) % multiple, width + (-width) % multiple


def pca_rgb(feats: torch.Tensor, niter: int, q_min: float, q_max: float) -> torch.Tensor:
    """Project (h, w, C) features on their top 3 principal components, scaled to [0, 1].

    Low-rank PCA with ``niter`` power iterations from a fixed seed, and each component's sign
    fixed so its largest loading is positive: the same input always gives the same colours.
    Each channel is stretched between its ``q_min`` and ``q_max`` quantiles and clamped.
    """
    h, w, c = feats.shape
    x = feats.reshape(-1, c).float()
    x = x - x.mean(dim=0, keepdim=True)
    q = min(3, *x.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(x, q=q, center=False, niter=niter)
    idx = v.abs().argmax(dim=0)
    v = v * torch.where(v[idx, torch.arange(q)] < 0, -1.0, 1.0)
    proj = x @ v
    if q < 3:
        proj = F.pad(proj, (0, 3 - q))
    lo = torch.quantile(proj, q_min, dim=0)
    hi = torch.quantile(proj, q_max, dim=0)
    out = (proj - lo) / (hi - lo).clamp(min=1e-12)
    return out.clamp(0.0, 1.0).reshape(h, w, 3)


def upsample_unpad(
    grid: torch.Tensor, padded_hw: tuple[int, int], out_hw: tuple[int, int], mode: InterpolationMode
) -> torch.Tensor:
    """Upsample an (h, w, C) patch grid to the padded image size, then crop the padding."""
    x = grid.permute(2, 0, 1).unsqueeze(0).float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(x, size=padded_hw, mode=mode, **kwargs)
    return x[0, :, : out_hw[0], : out_hw[1]].permute(1, 2, 0)


def to_layout(x: torch.Tensor, fmt: TensorFormat) -> torch.Tensor:
    """(H, W, C) -> the requested layout."""
    return x.permute(2, 0, 1) if fmt == "CHW" else x


def interpolate_pos_embed(
    pos: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], n_prefix: int = 1
) -> torch.Tensor:
    """Resize the grid part of a (n_prefix + gh*gw, C) positional embedding to ``dst_grid``.

    The seed's recipe (F3RM's, from DINO): bicubic with scale factors (g + 0.1) / native side,
    not an exact output size; the two sample the table at different positions and differ by
    ~2 % of the features. At the native grid the table is used as is.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    prefix, grid = pos[:n_prefix], pos[n_prefix:]
    c = grid.shape[-1]
    grid = grid.reshape(1, src_grid[0], src_grid[1], c).permute(0, 3, 1, 2).float()
    scale = ((dst_grid[0] + 0.1) / src_grid[0], (dst_grid[1] + 0.1) / src_grid[1])
    grid = F.interpolate(
        grid, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False
    )
    if tuple(grid.shape[-2:]) != tuple(dst_grid):
        raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, wanted {dst_grid}")
    grid = grid.permute(0, 2, 3, 1).reshape(dst_grid[0] * dst_grid[1], c).to(pos.dtype)
    return torch.cat([prefix, grid], dim=0)


class DenseRequest(Protocol):
    """The dense options of a request (apis/http/schemas.py ``DenseOptions``), as this module
    reads them."""

    load_size: int | None
    ret_patches: bool
    ret_pca: bool
    pca_niter: int
    pca_q_min: float
    pca_q_max: float
    interpolation_mode: InterpolationMode
    tensor_format: TensorFormat
    padding_mode: PaddingMode
    output_dtype: str
    response_format: str


@dataclass(frozen=True)
class Geometry:
    """Where a dense request's pixels go: resized image, padded input and the patch grid, (H, W)."""

    resized: tuple[int, int]
    padded: tuple[int, int]
    grid: tuple[int, int]


_SHRINK_HINT = "ask for ret_patches=true, ret_pca=true, a smaller load_size or output_dtype=float16"


def plan(
    size: tuple[int, int], r: DenseRequest, patch: int, stride: int, channels: int, limits: Limits
) -> Geometry:
    """Check a dense request before computing anything; raises APIError saying what to change.

    ``size`` is the image's (width, height); ``r`` the request (its dense options); the grid has
    ``1 + (Hp - patch) // stride`` rows on the image padded to a multiple of ``patch``.
    """
    w, h = resized_size(*size, r.load_size)
    if getattr(r, "center_crop", False):
        w = h = min(w, h)
    if w * h > limits.max_image_pixels:
        raise APIError(
            400,
            f"load_size={r.load_size} would resize the image to {w}x{h}, over this server's "
            f"{limits.max_image_pixels / 1e6:.0f} MP limit; use a smaller load_size",
            param="load_size",
        )
    ph, pw = padded_size(h, w, patch)
    if r.padding_mode in ("reflect", "circular") and (ph - h >= h or pw - w >= w):
        raise APIError(
            400,
            f"padding_mode={r.padding_mode!r} needs an image larger than the padding "
            f"({w}x{h} px for patch {patch}); use 'constant' or 'replicate'",
            param="padding_mode",
        )
    grid = (1 + (ph - patch) // stride, 1 + (pw - patch) // stride)
    if grid[0] * grid[1] > limits.max_tokens:
        raise APIError(
            400,
            f"the image makes a {grid[0]}x{grid[1]} patch grid ({grid[0] * grid[1]} tokens), over this "
            f"server's limit of {limits.max_tokens}; use a smaller load_size or a larger stride",
            param="load_size",
        )
    out_hw = grid if r.ret_patches else (h, w)
    shape = (*out_hw, channels) if channels > 1 else out_hw
    check_response_size(shape, r.output_dtype, limits.max_response_bytes, _SHRINK_HINT)
    return Geometry((h, w), (ph, pw), grid)


def upsample_grid(grid: torch.Tensor, geom: Geometry, mode: InterpolationMode) -> torch.Tensor:
    """(gh, gw, C) patch grid -> (H, W, C) pixels of the resized image.

    The grid is stretched over the padded input, then the padding is cropped off.
    """
    return upsample_unpad(grid, geom.padded, geom.resized, mode)


def respond(feats: torch.Tensor, geom: Geometry, r: DenseRequest, model_id: str) -> dict[str, Any]:
    """The dense routes' answer for one (gh, gw, C) grid: optional PCA, upsampling, layout, base64."""
    if r.ret_pca:
        feats = pca_rgb(feats, r.pca_niter, r.pca_q_min, r.pca_q_max)
    if not r.ret_patches:
        feats = upsample_grid(feats, geom, r.interpolation_mode)
    arr = to_layout(feats, r.tensor_format).numpy()
    return tensor_answer(arr, "features", r.output_dtype, r.response_format, is_pca=r.ret_pca, model=model_id)
