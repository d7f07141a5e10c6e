"""CLIP text over the deciding prefix (``apis.clip.model.encode_texts``): the batch runs only up
to its longest prompt's end token, and equals open_clip's own ``encode_text`` over all 77
positions within 1e-6, for prompts of every length from 2 to 77 tokens mixed in one batch; text
towers where the cut is not exact (no causal mask, pooling not at the end token) run whole."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from apis.clip import model as cm_model
from apis.core.settings import ModelEntry
from tests.conftest import CLIP_ARCH

# one word = one token for this tokenizer; 0 words = start + end tokens, 80 words are cut at 77
WORDS = [0, 1, 2, 3, 7, 12, 30, 50, 73, 74, 75, 80]


def load(path, name: str, weights: str):
    entry = ModelEntry(name=name, pretrained="testfile", weights=weights, arch_config=str(path))
    return cm_model.load_clip(entry, "cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, clip_checkpoint):
    return load(CLIP_ARCH, "clip-tiny", str(clip_checkpoint))


def texts_of(words: list[int]) -> list[str]:
    return [" ".join(["photo"] * n) for n in words]


def test_mixed_lengths_equal_open_clip_encode_text(tiny):
    texts = texts_of(WORDS)
    tokens = tiny.tokenizer(texts)
    lengths = (tokens != 0).sum(-1).tolist()
    assert lengths == [min(n + 2, 77) for n in WORDS] and max(lengths) == 77
    with torch.no_grad():
        want = F.normalize(tiny.model.encode_text(tokens), dim=-1)
    got = cm_model.encode_texts(tiny, texts)
    assert (got - want).abs().max().item() < 1e-6
    # each prompt alone (its own, shorter prefix) gives the same embedding as in the mixed batch
    for i, text in enumerate(texts):
        assert (cm_model.encode_texts(tiny, [text])[0] - want[i]).abs().max().item() < 1e-6


@pytest.mark.parametrize("words", [[0], [3, 1], [12, 30, 7], [75, 2]])
def test_the_forward_runs_only_to_the_longest_end_token(tiny, words, monkeypatch):
    seen: list[int] = []
    block = cm_model.attention_block
    monkeypatch.setattr(
        cm_model, "attention_block", lambda b, x, m=None: seen.append(x.shape[1]) or block(b, x, m)
    )
    cm_model.encode_texts(tiny, texts_of(words))
    assert set(seen) == {max(words) + 2}


@pytest.mark.parametrize(
    ("text_cfg", "why"),
    [
        ({"no_causal_mask": True}, "every position sees the padding"),
        ({"pool_type": "first"}, "pooled at the start"),
    ],
)
def test_text_towers_where_the_cut_is_not_exact_run_whole(tmp_path, text_cfg, why):
    arch = json.loads(CLIP_ARCH.read_text())
    arch["text_cfg"].update(text_cfg)
    path = tmp_path / "clip-tiny-variant.json"
    path.write_text(json.dumps(arch))
    torch.manual_seed(0)
    cm = load(path, "clip-tiny-variant", "random")
    texts = texts_of([1, 5])
    assert cm_model._deciding_length(cm.model, cm.tokenizer(texts)) is None, why
    with torch.no_grad():
        want = F.normalize(cm.model.encode_text(cm.tokenizer(texts)), dim=-1)
    assert (cm_model.encode_texts(cm, texts) - want).abs().max().item() < 1e-6
    assert isinstance(cm.model, open_clip.model.CLIP)
