"""Rules written out in numpy, as references that share no code with the server.

Each mode is a (out, in) weight matrix per axis, built from the rule as PyTorch documents it
(half-pixel centres, ``align_corners=False``); a grid is resampled by applying the matrix of
each axis. The tests compare the server's upsampling and positional-embedding resizing with
these, so a wrong mode, scale or coordinate convention shows up as different numbers.
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
