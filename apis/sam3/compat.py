"""What sam3 0.1.4 needs to run on a CPU-only host, on a second GPU, and with random weights.

Each patch below fixes one place where the library assumes the first CUDA device; none changes
a number the model computes. :func:`install` is idempotent and runs before any model is built.

* ``PositionEmbeddingSine(precompute_resolution=...)`` fills its cache with tensors made on
  ``"cuda"``. Without CUDA we skip the precomputation: ``forward`` computes and caches the same
  values on first use, on the input's device.
* ``TransformerDecoder.__init__`` builds its box-bias coordinates with ``device="cuda"``.
  Without CUDA they are made on the CPU instead.
* ``geometry_encoders`` pins a small tensor (``Tensor.pin_memory``) on every prompt, text ones
  included. Pinning needs a CUDA driver; without one it is a no-op here.
* Both caches above are plain dicts, which ``model.to(device)`` does not move: after moving a
  model, :func:`move_caches` puts them on the model's device (a worker on ``cuda:1`` or ``cpu``
  of a GPU host would otherwise mix devices).
* The wheel ships no BPE vocabulary; open_clip packages the same ``bpe_simple_vocab_16e6``.
* ``TextTransformer.positional_embedding`` and ``text_projection`` are ``torch.empty``: a
  checkpoint overwrites them, but a random-weights model would compute NaN scores from
  whatever memory they held. :func:`init_untrained` gives them open_clip's initialisation.
"""

from __future__ import annotations

import functools

import torch
from open_clip.tokenizer import default_bpe
from sam3.model.decoder import TransformerDecoder
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.text_encoder_ve import TextTransformer

_MARK = "_visionserve_cpu_safe"


def bpe_path() -> str:
    """The CLIP BPE vocabulary sam3's tokenizer reads (the copy inside open_clip)."""
    return default_bpe()


def install() -> None:
    if getattr(PositionEmbeddingSine.__init__, _MARK, False):
        return

    original_init = PositionEmbeddingSine.__init__

    @functools.wraps(original_init)
    def pos_init(self, *args, precompute_resolution=None, **kwargs):
        if not torch.cuda.is_available():
            precompute_resolution = None
        original_init(self, *args, precompute_resolution=precompute_resolution, **kwargs)

    setattr(pos_init, _MARK, True)
    PositionEmbeddingSine.__init__ = pos_init

    original_coords = TransformerDecoder._get_coords

    def get_coords(H, W, device):  # noqa: N803 (the library's names)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        return original_coords(H, W, device)

    TransformerDecoder._get_coords = staticmethod(get_coords)

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def move_caches(model: torch.nn.Module, device: torch.device) -> None:
    """Put the position-encoding and box-coordinate caches on ``device`` (see module docstring)."""
    for module in model.modules():
        if isinstance(module, PositionEmbeddingSine):
            module.cache = {k: v.to(device) for k, v in module.cache.items()}
        elif isinstance(module, TransformerDecoder):
            coords = getattr(module, "compilable_cord_cache", None)
            if coords is not None:
                module.compilable_cord_cache = tuple(t.to(device) for t in coords)
            cache = getattr(module, "coord_cache", {})
            module.coord_cache = {k: tuple(t.to(device) for t in v) for k, v in cache.items()}


def init_untrained(model: torch.nn.Module) -> None:
    """open_clip's initialisation for the two text-encoder parameters sam3 leaves empty."""
    for module in model.modules():
        if isinstance(module, TextTransformer):
            torch.nn.init.normal_(module.positional_embedding, std=0.01)
            if isinstance(module.text_projection, torch.nn.Parameter):
                torch.nn.init.normal_(module.text_projection, std=module.width**-0.5)
