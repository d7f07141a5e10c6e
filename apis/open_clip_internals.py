"""Every contact with open_clip's internals, checked against open_clip_torch 3.3.0 (the pin in
pyproject.toml).

apis/clip/model.py uses open_clip's exported API (``create_model``, ``get_tokenizer``,
``get_model_preprocess_cfg``, ``CLIP.encode_text`` ...) and, to write the MaskCLIP and the cut
text forwards out, the modules' parameters. What open_clip does not export is here: its eval
transform from a preprocess config, the text tower's pooling, the vision tower's class, the
hub download, the BPE vocabulary file (sam3's tokenizer reads it too), and the test that a
block is the plain self-attention block those forwards reproduce (it reads a private flag of
torch's ``MultiheadAttention``). tests/unit/test_internals_contract.py fails on another release
and checks each name used here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.tokenizer import default_bpe
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer, text_global_pool

OPEN_CLIP_VERSION = "3.3.0"


def eval_transform(preprocess_cfg: dict[str, Any]) -> Callable:
    """What ``create_model_and_transforms`` returns as its validation transform, for a model's
    ``get_model_preprocess_cfg``: PIL image -> (3, S, S) tensor."""
    return image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)


def text_pool(
    x: torch.Tensor, tokens: torch.Tensor, pool_type: str, eos_token_id: int | None
) -> torch.Tensor:
    """The text tower's pooling of (B, L, D) features at the end-of-text token, as ``encode_text``."""
    return text_global_pool(x, tokens, pool_type, eos_token_id=eos_token_id)


def is_vision_transformer(visual: torch.nn.Module) -> bool:
    return isinstance(visual, VisionTransformer)


def standard_blocks(blocks: torch.nn.ModuleList) -> bool:
    """Whether every block is a plain self-attention ``ResidualAttentionBlock`` (one fused input
    projection, no bias_k, no zero attention, no separate key/value norm)."""
    return all(
        isinstance(b.attn, torch.nn.MultiheadAttention)
        and b.attn._qkv_same_embed_dim
        and b.attn.bias_k is None
        and not b.attn.add_zero_attn
        and not hasattr(b, "ln_1_kv")
        for b in blocks
    )


def download_from_hf(repo: str) -> str:
    """The weights file of an ``hf-hub:`` model, by open_clip's own download."""
    return download_pretrained_from_hf(repo)


def bpe_vocabulary() -> str:
    """The path of the CLIP BPE vocabulary (``bpe_simple_vocab_16e6``) inside open_clip."""
    return default_bpe()
