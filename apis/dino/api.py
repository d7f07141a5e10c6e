"""DINO routes: ``/dino/extract`` (seed 004's fields) and ``/dino/embed``. The maths lives in
:mod:`apis.dino.model`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace

from apis.core.encodings import encode_array
from apis.core.errors import APIError
from apis.core.lazy import lazy_module
from apis.core.settings import ModelEntry
from apis.dino.options import POOLINGS, Facet
from apis.dino.schemas import (
    DinoEmbedRequest,
    DinoEmbedResponse,
    DinoExtractRequest,
    DinoExtractResponse,
    DinoModelSelector,
)
from apis.family import FamilyAPI, Job, Route
from apis.vectors import Vectors, VectorsRoute, check_count

dino_model = lazy_module("apis.dino.model")  # the library loads in the worker (apis/core/lazy.py)
dense = lazy_module("apis.core.dense")  # torch too: worker only
torch = lazy_module("torch")


@dataclass
class DenseInput:
    """An extract request's image, normalised and padded, where its patches land, and the
    forward it asks for."""

    x: torch.Tensor  # (1, 3, Hp, Wp)
    geom: dense.Geometry
    stride: int
    layer: int  # 0..depth-1
    facet: Facet
    bin: bool


class Extract(Route):
    name = "extract"
    request = DinoExtractRequest
    response = DinoExtractResponse
    summary = "Dense DINOv2 features: facet, layer, stride, log-binning."

    def decode(self, model: dino_model.DinoModel, job: Job) -> DenseInput:
        r: DinoExtractRequest = job.request
        patch = model.patch_size
        stride = r.stride or patch
        if patch % stride:
            divisors = [s for s in range(1, patch + 1) if patch % s == 0]
            raise APIError(
                400,
                f"stride {stride} does not divide the patch size {patch}; use one of {divisors} or null",
                param="stride",
            )
        if not -model.depth <= r.layer < model.depth:
            raise APIError(
                400,
                f"layer {r.layer} is out of range: {job.model_id} has {model.depth} blocks, so use "
                f"0..{model.depth - 1} or -{model.depth}..-1",
                param="layer",
            )
        channels = 3 if r.ret_pca else model.embed_dim * (dino_model.BIN_CELLS if r.bin else 1)
        geom = dense.plan(job.image.size, r, patch, stride, channels, self.api.cfg.limits)
        x = dense.preprocess(
            job.image, r.load_size, False, patch, r.padding_mode, dense.IMAGENET_MEAN, dense.IMAGENET_STD
        )
        return DenseInput(x, geom, stride, r.layer % model.depth, r.facet, r.bin)

    def batch_key(self, item: DenseInput) -> Hashable:
        """Inputs of one padded size that ask for the same forward share it."""
        return (tuple(item.x.shape), item.stride, item.layer, item.facet, item.bin)

    def predict(self, model: dino_model.DinoModel, items: list[DenseInput]) -> torch.Tensor:
        first = items[0]
        feats = dino_model.dense_features(
            model, torch.cat([i.x for i in items]), first.stride, first.facet, first.layer
        )
        return (dino_model.log_bin(feats) if first.bin else feats).cpu()

    def encode(self, job: Job, item: DenseInput, feats: torch.Tensor) -> dict:
        return dense.respond(feats, item.geom, job.request, job.model_id)


class Embed(VectorsRoute):
    """Every image of the batch's requests in one forward, whatever pooling each asks for:
    the model gives both poolings and each answer picks its own."""

    request = DinoEmbedRequest
    response = DinoEmbedResponse
    summary = "Global DINOv2 image embeddings: the class token or the mean of the patch tokens."

    def check(self, request: DinoEmbedRequest) -> None:
        check_count(len(request.images), self.api.cfg.limits, "images", "images")

    def encode_images(self, model: dino_model.DinoModel, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 2, D): both poolings (apis.dino.model.POOLINGS) of each image."""
        return dino_model.global_embeddings(model, pixels)

    def openai_request(self, images: list[bytes], texts: list[str]) -> DinoEmbedRequest:
        """The class token, L2-normalised as OpenAI's embeddings are (no texts: no text tower)."""
        return DinoEmbedRequest.model_construct(images=images, pooling="cls", normalize=True)

    def chosen(self, request: DinoEmbedRequest, vectors: Vectors) -> Vectors:
        """The pooling the request asked for, normalised if it asked (no texts)."""
        emb = vectors.images[:, POOLINGS.index(request.pooling)]
        if request.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return replace(vectors, images=emb, texts=emb[:0])

    def family_answer(self, job: Job, vectors: Vectors) -> dict:
        r: DinoEmbedRequest = job.request
        data, shape = encode_array(vectors.images.numpy(), r.output_dtype)
        return {
            "embeddings": data,
            "shape": shape,
            "dtype": r.output_dtype,
            "pooling": r.pooling,
            "normalized": r.normalize,
            "model": job.model_id,
        }


class DinoAPI(FamilyAPI):
    family = "dino"
    selector = DinoModelSelector
    routes = (Extract, Embed)
    reuses_freed_memory = True  # /dino/extract 1.02x and 1.18x (docs/benchmarks.md, Allocator)

    def load_model(self, entry: ModelEntry) -> dino_model.DinoModel:
        return dino_model.load_dino(entry, self.torch_device, self.compute_dtype)
