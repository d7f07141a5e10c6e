"""Background removal maths: an ONNX matting model (BRIA RMBG-2.0 / 1.4, BiRefNet exports) run by
onnxruntime, with each model's documented pre- and post-processing.

Plain functions on numpy and PIL, callable from tests and benchmarks without a server:
:func:`preprocess` -> :meth:`RmbgModel.run` -> :func:`alpha_matte` -> :func:`cutout`.
"""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from PIL import Image

from apis.core.dense import IMAGENET_MEAN, IMAGENET_STD
from apis.rmbg.settings import RmbgModelEntry

log = logging.getLogger("visionserve")

DEFAULT_INPUT_SIZE = 1024  # RMBG-2.0 and RMBG-1.4 cards


@dataclass(frozen=True)
class Processing:
    """How a model wants its input and what its output means.

    * ``input_size``: the square side the image is resized to (bilinear); None = the ONNX
      input's own fixed size, or 1024 (both BRIA cards) when the export takes any size.
    * ``mean`` / ``std``: normalisation of the [0, 1] RGB pixels.
    * ``activation``: ``sigmoid`` when the model outputs logits, ``none`` when probabilities.
    * ``min_max``: stretch each matte to the full [0, 1] range after resizing (RMBG-1.4's card).
    """

    input_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    activation: Literal["sigmoid", "none"] = "sigmoid"
    min_max: bool = False


#: Defaults by model family, from the BRIA model cards' example code.
PRESETS: dict[str, Processing] = {
    # RMBG-2.0 (BiRefNet): Resize 1024x1024, ToTensor, ImageNet Normalize; preds[-1].sigmoid().
    "rmbg-2.0": Processing(None, IMAGENET_MEAN, IMAGENET_STD, "sigmoid", False),
    # BiRefNet exports: the same as RMBG-2.0 (its base architecture).
    "birefnet": Processing(None, IMAGENET_MEAN, IMAGENET_STD, "sigmoid", False),
    # RMBG-1.4 (IS-Net): 1024x1024, /255, Normalize(mean 0.5, std 1.0); the network already ends
    # in a sigmoid; postprocess resizes and min-max normalises the matte.
    "rmbg-1.4": Processing(None, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), "none", True),
}


def processing_for(entry: RmbgModelEntry) -> Processing:
    """The entry's processing: its ``preset`` (or the one its name starts with: 'RMBG-2.0',
    'briaai/RMBG-1.4', 'birefnet-general', ...) with the entry's explicit fields on top."""
    name = entry.preset or entry.name.strip().lower().replace("_", "-").rsplit("/", 1)[-1]
    base = next((p for prefix, p in PRESETS.items() if name.startswith(prefix)), None)
    if base is None:
        raise ValueError(
            f"rmbg model {entry.name!r}: set `preset` (rmbg-2.0, rmbg-1.4 or birefnet) so its "
            "input size, normalisation and output activation are known"
        )
    explicit = {
        f: getattr(entry, f)
        for f in ("input_size", "mean", "std", "activation", "min_max")
        if getattr(entry, f) is not None
    }
    return replace(base, **explicit)


def load_rmbg(entry: RmbgModelEntry, device: str) -> RmbgModel:
    """The configured ONNX file, or (``weights: random``) a tiny random network of the same
    signature at 64 px."""
    processing = processing_for(entry)
    if entry.is_random:
        size = entry.input_size or 64
        return RmbgModel(tiny_onnx(size=size), replace(processing, input_size=size), device)
    if not entry.weights:
        raise ValueError(f"rmbg model {entry.name!r}: give `weights`, the path of its .onnx file")
    if not Path(entry.weights).is_file():
        raise FileNotFoundError(f"RMBG model file for {entry.name} not found: {entry.weights}")
    return RmbgModel(Path(entry.weights), processing, device)


class RmbgModel:
    """An onnxruntime session of a one-input, mask-output matting model on one device."""

    def __init__(self, model: str | bytes | Path, processing: Processing, device: str = "cpu"):
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device_id = int(device.split(":")[1]) if ":" in device else 0
                providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
            else:
                log.warning(
                    "onnxruntime has no CUDA provider here (install onnxruntime-gpu): RMBG runs on the CPU "
                    "although its worker was placed on %s",
                    device,
                )
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, providers=providers)
        self.providers = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"a background-removal model takes one image input; this one has {len(inputs)}")
        self.input = inputs[0]
        self.output = outputs[0]
        if len(outputs) > 1:
            log.info("RMBG model has %d outputs; using the first, %r", len(outputs), self.output.name)
        shape = self.input.shape
        if len(shape) != 4 or shape[1] not in (3, "3"):
            raise ValueError(f"expected an (N, 3, H, W) image input, got {self.input.name} {shape}")
        static = [d if isinstance(d, int) else None for d in shape[2:]]
        size = processing.input_size
        if size is None:
            size = static[0] if None not in static else DEFAULT_INPUT_SIZE
        if None not in static and static != [size, size]:
            raise ValueError(f"input_size {size} does not fit the model's fixed input {shape}")
        self.size = size
        self.processing = processing
        self.dynamic_batch = not isinstance(shape[0], int)
        self.input_dtype = np.float16 if self.input.type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) preprocessed images -> (N, S', S') raw model outputs, float32; one
        session call when the batch axis is dynamic, else one per image."""
        x = batch.astype(self.input_dtype, copy=False)
        if self.dynamic_batch or len(x) == 1:
            outs = [self.session.run([self.output.name], {self.input.name: x})[0]]
        else:
            outs = [
                self.session.run([self.output.name], {self.input.name: x[i : i + 1]})[0]
                for i in range(len(x))
            ]
        out = np.concatenate(outs).astype(np.float32)
        return out.reshape(out.shape[0], out.shape[-2], out.shape[-1])


def preprocess(image: Image.Image, size: int, processing: Processing) -> np.ndarray:
    """(3, S, S) float32: RGB resized to S x S (PIL bilinear), scaled to [0, 1], normalised."""
    rgb = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    mean = np.asarray(processing.mean, np.float32)
    std = np.asarray(processing.std, np.float32)
    return ((rgb - mean) / std).transpose(2, 0, 1)


def alpha_matte(raw: np.ndarray, width: int, height: int, processing: Processing) -> np.ndarray:
    """One raw output (S', S') -> (H, W) float32 alpha in [0, 1]: activation, bilinear resize to
    the image, min-max stretch when the model's card asks for it, then clipping (the seed left
    values outside [0, 1], which wrapped around in its 8-bit alpha)."""
    matte = 0.5 + 0.5 * np.tanh(0.5 * raw) if processing.activation == "sigmoid" else raw  # sigmoid
    matte = np.asarray(Image.fromarray(matte.astype(np.float32)).resize((width, height), Image.BILINEAR))
    if processing.min_max:
        lo, hi = float(matte.min()), float(matte.max())
        matte = (matte - lo) / (hi - lo) if hi > lo else np.zeros_like(matte)
    return np.clip(matte, 0.0, 1.0)


def alpha_channel(matte: np.ndarray, threshold: float | None) -> np.ndarray:
    """(H, W) uint8 alpha: the soft matte x 255 rounded, or 0/255 split at ``threshold``."""
    if threshold is None:
        return np.rint(matte * 255.0).astype(np.uint8)
    return np.where(matte > threshold, 255, 0).astype(np.uint8)


def cutout(image: Image.Image, alpha: np.ndarray) -> Image.Image:
    """RGBA image: the input's RGB unchanged, ``alpha`` as its alpha channel."""
    rgba = image.convert("RGB")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def encode_image(image: Image.Image, fmt: Literal["png", "webp"]) -> bytes:
    """PNG, or lossless WebP that keeps the RGB of fully transparent pixels too."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="WEBP", lossless=True, exact=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- tiny model


def tiny_onnx(
    path: str | Path | None = None, seed: int = 0, size: int = 64, dynamic_batch: bool = True
) -> bytes:
    """A small random convolutional matting network exported to ONNX with the RMBG signature:
    ``input`` (N, 3, size, size) float32 -> ``output`` (N, 1, size, size) logits, N dynamic or
    fixed at 1. For tests and the offline demo; written to ``path`` too when given."""
    import torch
    from torch import nn

    class TinyMatting(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                nn.ReLU(),
                nn.Conv2d(8, 1, 3, padding=1),
            )

        def forward(self, x):
            return self.body(x) * 4.0  # spread the logits so mattes use the whole range

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = TinyMatting().eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(
        module,
        (torch.zeros(2 if dynamic_batch else 1, 3, size, size),),
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes={"x": {0: batch}} if dynamic_batch else None,
        dynamo=True,
        verbose=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(path) if path is not None else Path(tmp) / "tiny.onnx"
        program.save(str(target))
        return target.read_bytes()
