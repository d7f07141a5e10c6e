"""Global embeddings (vectors) shared by ``/clip/embed``, ``/dino/embed`` and ``/v1/embeddings``
(SAM's ``/<family>/embed``, which caches an image for ``image_id``, is another thing).

One job carries a request's images (checked file bytes) and texts. The worker decodes the
images with the model library's own evaluation transform, so every image has the model's input
size, and runs ALL the images of a batch of requests through one forward (and all the texts
through another), in chunks of at most ``limits.max_embed_inputs`` so memory stays bounded by
what one request may ask for. The answer is the family's own JSON or, for ``/v1/embeddings``,
OpenAI's (rendered here, in the worker, like every other answer).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pybase64
from pydantic import BaseModel

from apis.config import ServerConfig
from apis.core.errors import APIError
from apis.core.images import decode_image, probe_image
from apis.core.lazy import lazy_module
from apis.core.replies import non_finite
from apis.core.settings import Limits
from apis.family import Job, Route
from apis.http.inputs import decode_base64
from apis.route import AnswerFormat

if TYPE_CHECKING:
    from PIL import Image

torch = lazy_module("torch")  # the HTTP process imports this module too: torch only in workers


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


#: Threads that decode and preprocess the images of one request in a worker (default: the worker's
#: torch threads). Pillow and torch release the GIL there; the model is idle meanwhile. 1 = one
#: after another (the "before" side of docs/benchmarks.md's table).
DECODE_THREADS_ENV = "VISIONSERVE_DECODE_THREADS"


@functools.cache
def _decoding_pool() -> ThreadPoolExecutor | None:
    """This worker's pool for decoding images (made on first use, in the worker), or None."""
    n = int(os.environ.get(DECODE_THREADS_ENV) or torch.get_num_threads())
    return ThreadPoolExecutor(n, thread_name_prefix="embed-decode") if n > 1 else None


def _decode(data: bytes, limits: Limits, param: str):
    try:
        return decode_image(data, limits)
    except APIError as e:
        raise APIError(e.status, f"{param}: {e.message}", param=param, code=e.code) from None


@dataclass(frozen=True)
class OpenAIOptions:
    """What OpenAI's embeddings list needs beyond the family's embed request, carried as a
    :class:`~apis.route.Job`'s ``openai`` when /v1/embeddings asked (apis/openai_routes.py; the
    list names the job's ``model_id``). ``kinds``: "image" or "text" for each input in request
    order (the job's images and texts keep their own order)."""

    kinds: tuple[str, ...]
    encoding_format: str
    dimensions: int | None

    def image_params(self) -> list[str]:
        """The request field of each image, for errors: ``input[i]``."""
        return [f"input[{i}]" for i, kind in enumerate(self.kinds) if kind == "image"]


@dataclass
class Vectors:
    """One request's embeddings, (N, D) each, and what /v1's usage counts."""

    images: torch.Tensor
    texts: torch.Tensor
    image_tokens: int  # per image: the ViT's tokens
    text_tokens: list[int]


class VectorsRoute(Route):
    """``/<family>/embed`` (and the family's share of ``/v1/embeddings``): global embeddings.

    The job's request is the family's embed request with ``images`` as checked file bytes
    (:meth:`read_inputs`; /v1/embeddings builds the same request) and, for a family without a
    text tower, no ``texts``. Subclasses give the model's steps and the family's own answer.
    """

    name = "embed"
    reads_files = True
    embeds_texts: ClassVar[bool] = False  # whether the family has a text tower in the images' space

    def dim(self, model: Any) -> int:
        """The embedding width (CLIP's and DINO's model holders both say it as ``embed_dim``)."""
        return model.embed_dim

    def preprocess(self, model: Any, image: Image.Image) -> torch.Tensor:
        """The library's own evaluation transform, kept on the model holder."""
        return model.preprocess(image)

    def encode_images(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, model: Any, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def count_tokens(self, model: Any, texts: list[str]) -> list[int]:
        """Tokens the text tower reads for each text (/v1's usage)."""
        return [0] * len(texts)

    def chosen(self, request: BaseModel, vectors: Vectors) -> Vectors:
        """What the request asked of the model's vectors (DINO: one pooling, normalised)."""
        return vectors

    def family_answer(self, job: Job, vectors: Vectors) -> dict:
        raise NotImplementedError

    def openai_request(self, images: list[bytes], texts: list[str]) -> BaseModel:
        """The family's own embed request for a /v1/embeddings one (images already read)."""
        return self.request.model_construct(images=images, texts=texts)

    def read_inputs(self, request: BaseModel) -> BaseModel:
        """The base64 images of ``/<family>/embed`` as checked bytes."""
        images = [read_image(t, self.api.cfg, f"images[{i}]") for i, t in enumerate(request.images)]
        return request.model_copy(update={"images": images})

    def decode(self, model: Any, job: Job) -> _EmbedInput:
        r = job.request
        dim = self.dim(model)
        openai = openai_options(job)
        asked = openai.dimensions if openai else None
        if asked is not None and asked != dim:
            raise APIError(
                400,
                f"dimensions={asked}, but {job.model_id} makes {dim}-dimensional embeddings and "
                f"cannot shorten them (it was not trained for truncation); leave dimensions out "
                f"or send {dim}",
                param="dimensions",
                code="unsupported_dimensions",
            )
        limits = self.api.cfg.limits

        def pixels_of(data: bytes, name: str) -> torch.Tensor:
            return self.preprocess(model, _decode(data, limits, name))

        names = openai.image_params() if openai else [f"images[{i}]" for i in range(len(r.images))]
        pool = _decoding_pool() if len(r.images) > 1 else None
        if pool is None:
            pixels = [pixels_of(b, n) for b, n in zip(r.images, names, strict=True)]
        else:  # the first bad image (in request order) answers the request, as one by one would
            pixels = list(pool.map(pixels_of, r.images, names))
        return _EmbedInput(pixels, list(getattr(r, "texts", [])), openai is not None)

    def predict(self, model: Any, items: list[_EmbedInput]) -> list[Vectors]:
        """Every image of the batch's requests through one forward, every text through another
        (in chunks), on the CPU."""
        dim = self.dim(model)
        pixels = [px for item in items for px in item.pixels]
        texts = [t for item in items for t in item.texts]
        images_emb = (
            self.chunked(lambda x: self.encode_images(model, x), torch.stack(pixels))
            if pixels
            else torch.empty(0, dim)
        )
        texts_emb = (
            self.chunked(lambda t: self.encode_texts(model, t), texts) if texts else torch.empty(0, dim)
        )
        out, i, t = [], 0, 0
        for item in items:
            n, m = len(item.pixels), len(item.texts)
            tokens = self.count_tokens(model, item.texts) if item.counts_tokens else []
            out.append(Vectors(images_emb[i : i + n], texts_emb[t : t + m], model.image_tokens, tokens))
            i, t = i + n, t + m
        return out

    def encode(self, job: Job, item: _EmbedInput, vectors: Vectors) -> dict:
        vectors = self.chosen(job.request, vectors)
        openai = openai_options(job)
        if openai:
            return openai_answer(openai, job.model_id, vectors)
        return self.family_answer(job, vectors)

    def chunked(self, forward: Callable[[Any], torch.Tensor], items: Sequence) -> torch.Tensor:
        """``forward`` over chunks of at most ``limits.max_embed_inputs`` items, concatenated on
        the CPU: memory stays bounded by what one request may ask for."""
        size = self.api.cfg.limits.max_embed_inputs
        return torch.cat([forward(items[start : start + size]).cpu() for start in range(0, len(items), size)])


@dataclass
class _EmbedInput:
    pixels: list[torch.Tensor]
    texts: list[str]
    counts_tokens: bool  # /v1/embeddings' usage: tokenizing the texts again is not free


def openai_options(job: Job) -> OpenAIOptions | None:
    """The job's OpenAI options when its answer is OpenAI's list, None for the family's own JSON:
    the one test of the answer format."""
    return job.openai if job.answer_format is AnswerFormat.OPENAI_EMBEDDINGS else None


def openai_answer(shape: OpenAIOptions, model_id: str, vectors: Vectors) -> dict:
    """OpenAI's embeddings list, inputs in request order; ``base64`` is little-endian float32,
    as OpenAI sends it. Usage counts the text tokens and, per image, the ViT's tokens."""
    images, texts = vectors.images, vectors.texts
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise non_finite("an embedding")
    rows = {"image": iter(images.numpy()), "text": iter(texts.numpy())}
    data = []
    for index, kind in enumerate(shape.kinds):
        v = np.ascontiguousarray(next(rows[kind]), dtype="<f4")
        emb = pybase64.b64encode_as_string(v.tobytes()) if shape.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": index, "embedding": emb})
    tokens = vectors.image_tokens * len(images) + sum(vectors.text_tokens)
    return {
        "object": "list",
        "data": data,
        "model": model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
