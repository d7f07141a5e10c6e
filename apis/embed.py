"""Global embeddings shared by ``/clip/embed``, ``/dino/embed`` and ``/v1/embeddings``.

One job carries a request's images (checked file bytes) and texts. The worker decodes the
images with the model library's own evaluation transform, so every image has the model's input
size, and runs ALL the images of a batch of requests through one forward (and all the texts
through another), in chunks of at most ``limits.max_embed_inputs`` so memory stays bounded by
what one request may ask for. The answer is the family's own JSON or, for ``/v1/embeddings``,
OpenAI's (rendered here, in the worker, like every other answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pybase64
import torch

from apis.config import ServerConfig
from apis.core.errors import APIError
from apis.core.images import decode_image, probe_image
from apis.core.replies import non_finite
from apis.core.settings import Limits
from apis.family import Job
from apis.http.inputs import decode_base64


def check_count(n: int, limits: Limits, param: str, what: str = "inputs") -> None:
    """400 unless 1 <= n <= ``limits.max_embed_inputs``."""
    if n == 0:
        raise APIError(400, f"no {what} given; send at least one", param=param)
    if n > limits.max_embed_inputs:
        raise APIError(
            400,
            f"{n} {what} in one request; this server takes at most {limits.max_embed_inputs} "
            "(limits.max_embed_inputs): split them over several requests",
            param=param,
            code="too_many_inputs",
        )


def read_image(text: str, cfg: ServerConfig, param: str) -> bytes:
    """Checked file bytes of one base64 image (or data URI); errors name ``param``."""
    try:
        data = decode_base64(text)
        probe_image(data, cfg.limits)
    except APIError as e:
        raise APIError(e.status, f"{param}: {e.message}", param=param, code=e.code) from None
    return data


def _decode(data: bytes, limits: Limits, param: str):
    try:
        return decode_image(data, limits)
    except APIError as e:
        raise APIError(e.status, f"{param}: {e.message}", param=param, code=e.code) from None


class EmbeddingRoutes:
    """Mixin of a :class:`~apis.family.FamilyAPI` that serves global embeddings.

    ``Job.params`` of an embedding job: ``images`` (file bytes), ``image_params`` (the request
    field each came from, for errors), ``texts``, ``output_dtype`` and ``openai`` (None, or what
    :func:`openai_answer` needs).
    """

    embeds_texts: bool = False  # whether the family has a text tower in the images' space

    def prepare_embed(self, job: Job) -> Job:
        """HTTP process: the base64 images of ``/<family>/embed`` as checked bytes."""
        names = [f"images[{i}]" for i in range(len(job.params["images"]))]
        job.params["images"] = [
            read_image(t, self.cfg, n) for t, n in zip(job.params["images"], names, strict=True)
        ]
        job.params["image_params"] = names
        job.params.setdefault("openai", None)
        return job

    def embed_batch(
        self,
        op: str,
        jobs: list[Job],
        dim: int,
        preprocess: Callable[[Any], torch.Tensor],
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor] | APIError]:
        """(image embeddings, text embeddings) per job on the CPU, or its error: the rows of what
        ``encode_images`` / ``encode_texts`` return ((n, dim) each for CLIP) that belong to the job."""
        out: list[Any] = [None] * len(jobs)
        pixels: list[torch.Tensor] = []
        texts: list[str] = []
        spans = {}
        for i, job in enumerate(jobs):
            p = job.params
            try:
                asked = (p["openai"] or {}).get("dimensions")
                if asked is not None and asked != dim:
                    raise APIError(
                        400,
                        f"dimensions={asked}, but {job.model_id} makes {dim}-dimensional embeddings and "
                        f"cannot shorten them (it was not trained for truncation); leave dimensions out "
                        f"or send {dim}",
                        param="dimensions",
                        code="unsupported_dimensions",
                    )
                px = [
                    preprocess(_decode(b, self.cfg.limits, name))
                    for b, name in zip(p["images"], p["image_params"], strict=True)
                ]
            except APIError as e:
                out[i] = e
                continue
            spans[i] = (len(pixels), len(pixels) + len(px), len(texts), len(texts) + len(p["texts"]))
            pixels += px
            texts += p["texts"]
        images_emb = self._chunked(encode_images, torch.stack(pixels), op) if pixels else torch.empty(0, dim)
        texts_emb = self._chunked(encode_texts, texts, op) if texts else torch.empty(0, dim)
        for i, (a, b, c, d) in spans.items():
            out[i] = (images_emb[a:b], texts_emb[c:d])
        return out

    def _chunked(self, forward: Callable, items: Sequence, op: str | None) -> torch.Tensor:
        """``forward`` over chunks of at most ``limits.max_embed_inputs`` items, concatenated on
        the CPU; each chunk counts as a forward of ``op`` in /info unless ``op`` is None."""
        size = self.cfg.limits.max_embed_inputs
        parts = []
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            if op is not None:
                self._forwards[op][len(chunk)] += 1
            parts.append(forward(chunk).cpu())
        return torch.cat(parts)


def openai_answer(
    job: Job, images: torch.Tensor, texts: torch.Tensor, image_tokens: int, text_tokens: list[int]
) -> dict:
    """OpenAI's embeddings list, inputs in request order; ``base64`` is little-endian float32,
    as OpenAI sends it. Usage counts the text tokens and, per image, the ViT's tokens."""
    oa = job.params["openai"]
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise non_finite("an embedding")
    rows = {"image": iter(images.numpy()), "text": iter(texts.numpy())}
    data = []
    for index, kind in enumerate(oa["kinds"]):
        v = np.ascontiguousarray(next(rows[kind]), dtype="<f4")
        emb = pybase64.b64encode_as_string(v.tobytes()) if oa["encoding_format"] == "base64" else v.tolist()
        data.append({"object": "embedding", "index": index, "embedding": emb})
    tokens = image_tokens * len(images) + sum(text_tokens)
    return {
        "object": "list",
        "data": data,
        "model": oa["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
