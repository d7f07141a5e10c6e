"""infinity-emb 0.0.78 as a bench/peers.py peer: CLIP ViT-B/16 sizes with random weights on both
sides, image and text embeddings through ``/v1/embeddings``.

    python bench/peers.py --peer infinity [--venvs DIR]

infinity loads a Hugging Face ``CLIPModel`` directory; ``prepare`` builds one with random
weights in the peer's own virtualenv (``python bench/peer_infinity.py DIR`` there): a
``CLIPConfig`` of ViT-B/16 sizes, a byte-level BPE vocabulary made here whose merges spell every
word of the benchmark's prompts as one token (so both text towers read the same number of
positions as open_clip's real vocabulary gives), and CLIP's image processor. visionserve serves
open_clip's ViT-B-16 with random weights: the same sizes, not the same weights.

Only the standard library is imported at the top: the builder runs under the peer's Python.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NAME = "infinity-emb 0.0.78"
READY_PATH = "/health"
SERVED = "clip-vit-b16-random"  # the model name on both servers' /v1/embeddings
OURS = "ViT-B-16"
TORCH_WHEEL = "torch==2.13.0"  # the CPU build, served from this machine's wheel folder
PROMPT = "a photo of object number {i} on a table"
MODEL_DIR = "hf-clip-vit-b16"


def install(venv: Path) -> None:
    """torch first (PyPI's torchvision and timm break against it and transformers' CLIP import
    fails through them, so they go again), then infinity with its server and torch extras; aiohttp
    is what decodes image inputs (without it they are a 500)."""
    python = venv / "bin" / "python"
    if python.exists() and _ran(python, "import infinity_emb, aiohttp, PIL"):
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_WHEEL], check=True)
    subprocess.run([*pip, "infinity-emb[server,torch]==0.0.78", "pillow", "aiohttp"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "timm"], check=True)


def _ran(python: Path, code: str) -> bool:
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def prepare(venv: Path, workdir: Path) -> None:
    out = workdir / MODEL_DIR
    if not (out / "config.json").exists():
        subprocess.run([str(venv / "bin" / "python"), __file__, str(out)], check=True)


def command(venv: Path, workdir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    cmd = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(workdir / MODEL_DIR)]
    cmd += ["--served-model-name", SERVED, "--engine", "torch", "--no-bettertransformer", "--device", "cpu"]
    cmd += ["--batch-size", "32", "--url-prefix", "/v1", "--host", "127.0.0.1", "--port", str(port)]
    return cmd, {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}  # no telemetry calls out


def ours_config(workdir: Path) -> dict:
    """open_clip's ViT-B-16 with random weights, batches up to 32 as infinity's ``--batch-size``."""
    return {
        "limits": {"max_body_bytes": 64 * 1024 * 1024},
        "clip": {
            "max_batch_size": 32,
            "batch_timeout": 0,
            "models": [{"name": OURS, "pretrained": "random", "weights": "random"}],
        },
    }


def workloads(workdir: Path) -> list:
    """The issue's table: images as data URIs of 640x480 JPEGs, texts of 10 words; ``modality``
    in infinity's body (its clients send it; ours accepts it too but needs it not)."""
    import base64

    from bench.embed_images import jpeg
    from bench.peers import Workload

    uris = [f"data:image/jpeg;base64,{base64.b64encode(jpeg(i)).decode('ascii')}" for i in range(16)]
    texts = [PROMPT.format(i=i) for i in range(32)]

    def bodies(inputs: list[list[str]], modality: str) -> tuple[list[dict], list[dict]]:
        peer = [{"model": SERVED, "input": x, "modality": modality} for x in inputs]
        ours = [{"model": f"{OURS}/random", "input": x} for x in inputs]
        return peer, ours

    alone = _ModelAlone()
    # name, concurrency, requests per run, inputs of each body, modality, the server's image batch
    rows = [
        ("one 640x480 JPEG per request", 1, 8, [[u] for u in uris], "image", 1),
        ("one image per request", 16, 48, [[u] for u in uris], "image", 16),
        ("8 images in one request", 1, 4, [uris[:8], uris[8:]], "image", 8),
        ("one text per request", 1, 32, [[t] for t in texts], "text", 0),
        ("one text per request", 32, 128, [[t] for t in texts], "text", 0),
    ]
    out = []
    for name, c, n, inputs, modality, batch in rows:
        peer, ours = bodies(inputs, modality)
        out.append(
            Workload(
                name=name,
                concurrency=c,
                requests=n,
                peer_path="/v1/embeddings",
                peer_bodies=peer,
                ours_path="/v1/embeddings",
                ours_bodies=ours,
                model_alone=alone.images(batch) if batch else None,
                model_alone_requests=batch // len(inputs[0]) if batch else 1,
                model_alone_label=f"open_clip encode_image alone (batch of {batch}, in-process)",
            )
        )
    return out


class _ModelAlone:
    """visionserve's own model work for the image rows, in this process: open_clip's forward on
    already preprocessed pixels, the batch the server forms (1, 16, or the request's 8)."""

    def __init__(self) -> None:
        self._cm = None

    def images(self, n: int):
        def run() -> None:
            import torch

            from apis.clip.model import encode_images, load_clip
            from apis.core.settings import ModelEntry

            if self._cm is None:
                self._cm = load_clip(ModelEntry(name=OURS, pretrained="random", weights="random"), "cpu")
            encode_images(self._cm, torch.randn(n, 3, 224, 224))

        return run


def build_hf_clip(out: Path) -> None:
    """A random-weight ``CLIPModel`` of ViT-B/16 sizes with its tokenizer and image processor."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=512,
    )
    out.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).eval().save_pretrained(out)
    vocab, merges = _bpe([PROMPT.format(i=i) for i in range(100)])
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    n = len(tokenizer(PROMPT.format(i=7))["input_ids"])
    print(
        f"built {out}: {sum(p.numel() for p in CLIPModel(config).parameters()) / 1e6:.0f} M params; "
        f"the prompt is {n} tokens"
    )


def _bpe(texts: list[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary (every byte alone and word-final) plus merges that join the
    letters of each word in ``texts`` left to right into one word-final token."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in sorted({w for t in texts for w in t.lower().split()}):
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = f"{left} {right}"
            left += right
            if merge not in merges:
                merges.append(merge)
                tokens.append(left)
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (CLIP's tokenizer uses them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    out = []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


if __name__ == "__main__":
    build_hf_clip(Path(sys.argv[1]))
