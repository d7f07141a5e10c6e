"""Rules written out in numpy, as references that share no code with the server.

Each mode is a (out, in) weight matrix per axis, built from the rule as PyTorch documents it
(half-pixel centres, ``align_corners=False``); a grid is resampled by applying the matrix of
each axis. The tests compare the server's upsampling and positional-embedding resizing with
these, so a wrong mode, scale or coordinate convention shows up as different numbers.
The flood fills at the end state SAM 3's "largest polygon" without OpenCV's contour walk.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def weights(mode: str, n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix of one axis. ``scale`` is input cells per output cell (default
    ``n_in / n_out``; ``F.interpolate(scale_factor=s)`` uses ``1 / s`` instead)."""
    s = n_in / n_out if scale is None else scale
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        if mode == "nearest":  # PyTorch's legacy nearest: floor(o * s)
            w[o, min(math.floor(o * s), n_in - 1)] = 1
        elif mode == "nearest-exact":  # pixel centres: floor((o + 0.5) * s)
            w[o, min(math.floor((o + 0.5) * s), n_in - 1)] = 1
        elif mode == "area":  # adaptive average pooling: the cells [floor(o s), ceil((o + 1) s))
            lo, hi = math.floor(o * n_in / n_out), math.ceil((o + 1) * n_in / n_out)
            w[o, lo:hi] = 1 / (hi - lo)
        elif mode == "bilinear":
            src = max((o + 0.5) * s - 0.5, 0.0)  # negative source positions clamp to 0
            i = math.floor(src)
            t = src - i
            w[o, min(i, n_in - 1)] += 1 - t
            w[o, min(i + 1, n_in - 1)] += t
        elif mode == "bicubic":
            src = (o + 0.5) * s - 0.5  # no clamping; taps off the edge repeat the edge cell
            i = math.floor(src)
            t = src - i
            for k, tap in enumerate(_cubic(np.array([t + 1, t, 1 - t, 2 - t]))):
                w[o, min(max(i - 1 + k, 0), n_in - 1)] += tap
        else:
            raise ValueError(mode)
    return w


def resample(grid: np.ndarray, size: tuple[int, int], mode: str, scale=(None, None)) -> np.ndarray:
    """(h, w, C) -> (size[0], size[1], C) by the rule of ``mode``, in float64."""
    wh = weights(mode, grid.shape[0], size[0], scale[0])
    ww = weights(mode, grid.shape[1], size[1], scale[1])
    return np.einsum("oh,hwc,pw->opc", wh, grid.astype(np.float64), ww)


def svd_pca_rgb(feats: np.ndarray, q_min: float, q_max: float) -> np.ndarray:
    """The documented PCA colouring with numpy: exact top-3 principal components (SVD of the
    centred features), each signed so its largest-magnitude loading is positive, projected,
    then each channel stretched between its q_min and q_max quantiles and clipped to [0, 1]."""
    h, w, c = feats.shape
    x = feats.reshape(-1, c).astype(np.float64)
    x = x - x.mean(axis=0)
    v = np.linalg.svd(x, full_matrices=False)[2][:3].T  # (C, 3)
    v = v * np.sign(v[np.abs(v).argmax(axis=0), np.arange(3)])
    proj = x @ v
    lo, hi = np.quantile(proj, q_min, axis=0), np.quantile(proj, q_max, axis=0)
    return np.clip((proj - lo) / (hi - lo), 0, 1).reshape(h, w, 3)


def randomized_pca_rgb(feats: np.ndarray, niter: int, q_min: float, q_max: float) -> np.ndarray:
    """The documented PCA colouring when the power iteration has not converged: Halko et al.'s
    randomized range finder (Algorithm 4.4) written in numpy, ``niter`` subspace iterations from
    the documented start (``torch.manual_seed(0)``, one Gaussian draw of (columns, 3), on the
    tall orientation of the centred features), then the sign rule and quantile stretch."""
    import torch

    h, w, c = feats.shape
    x = feats.reshape(-1, c).astype(np.float64)
    x = x - x.mean(axis=0)
    a = x if x.shape[0] >= x.shape[1] else x.T
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(a.shape[1], 3, generator=gen).numpy().astype(np.float64)
    q = np.linalg.qr(a @ r)[0]
    for _ in range(niter):
        q = np.linalg.qr(a.T @ q)[0]
        q = np.linalg.qr(a @ q)[0]
    u, _, vh = np.linalg.svd(q.T @ a, full_matrices=False)
    v = vh.T if a is x else q @ u  # (C, 3) right singular vectors of x
    v = v * np.sign(v[np.abs(v).argmax(axis=0), np.arange(3)])
    proj = x @ v
    lo, hi = np.quantile(proj, q_min, axis=0), np.quantile(proj, q_max, axis=0)
    return np.clip((proj - lo) / (hi - lo), 0, 1).reshape(h, w, 3)


def _flood(grid: np.ndarray, seeds: list[tuple[int, int]], steps: list[tuple[int, int]]) -> np.ndarray:
    """Cells of ``grid`` (bool) reachable from ``seeds`` through ``grid`` cells by ``steps``."""
    h, w = grid.shape
    seen = np.zeros_like(grid, dtype=bool)
    todo = [s for s in seeds if grid[s]]
    for s in todo:
        seen[s] = True
    while todo:
        y, x = todo.pop()
        for dy, dx in steps:
            v, u = y + dy, x + dx
            if 0 <= v < h and 0 <= u < w and grid[v, u] and not seen[v, u]:
                seen[v, u] = True
                todo.append((v, u))
    return seen


FOUR = [(-1, 0), (1, 0), (0, -1), (0, 1)]
EIGHT = FOUR + [(-1, -1), (-1, 1), (1, -1), (1, 1)]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, each as a boolean mask."""
    left = mask.astype(bool).copy()
    out = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if left[y, x]:
            part = _flood(left, [(int(y), int(x))], EIGHT)
            left &= ~part
            out.append(part)
    return out


def holes_filled(shape: np.ndarray) -> np.ndarray:
    """The shape plus every background pixel that the outside cannot reach 4-connectedly (the
    background neighbourhood that pairs with an 8-connected shape)."""
    ground = np.pad(~shape.astype(bool), 1, constant_values=True)  # a ring joins all the outside
    return ~_flood(ground, [(0, 0)], FOUR)[1:-1, 1:-1]


def outline_area(region: np.ndarray) -> float:
    """Area inside the closed outline through the centres of a filled region's boundary pixels
    (the polygon a contour walk gives), from 2x2 pixel blocks alone: a block of four region
    pixels adds its unit square between their centres, a block of three the half square their
    outline cuts off; two or fewer add nothing (an 8-connected outline passes straight by)."""
    f = region.astype(int)
    n = f[:-1, :-1] + f[1:, :-1] + f[:-1, 1:] + f[1:, 1:]
    return float((n == 4).sum() + 0.5 * (n == 3).sum())


def largest_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The regions a "largest external outline" of ``mask`` may enclose: of its 8-connected
    components with their holes filled, those whose outline encloses the most area (ties
    give several). Not the most pixels: a ragged component can have more pixels and a
    smaller outline area."""
    filled = [holes_filled(c) for c in components(mask)]
    if not filled:
        return []
    areas = [outline_area(f) for f in filled]
    return [f for f, a in zip(filled, areas, strict=True) if a == max(areas)]
