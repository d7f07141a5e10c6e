"""CLIP routes: ``/clip/extract``, ``/clip/encode_text``, ``/clip/similarity`` (seed 004's
fields), ``/clip/embed`` and ``/clip/classify``. The maths lives in :mod:`apis.clip.model`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from apis.clip.schemas import (
    ClipClassifyRequest,
    ClipClassifyResponse,
    ClipEmbedRequest,
    ClipEmbedResponse,
    ClipExtractRequest,
    ClipExtractResponse,
    ClipModelSelector,
    ClipSimilarityRequest,
    ClipSimilarityResponse,
    ClipTextRequest,
    ClipTextResponse,
)
from apis.core.encodings import encode_array, tensor_answer
from apis.core.lazy import lazy_module
from apis.core.registry import Key, canonical
from apis.core.settings import ModelEntry
from apis.family import FamilyAPI, Job, Route
from apis.vectors import Vectors, VectorsRoute, check_count

clip_model = lazy_module("apis.clip.model")  # the library loads in the worker (apis/core/lazy.py)
dense = lazy_module("apis.core.dense")  # torch too: worker only
torch = lazy_module("torch")


def clip_key(name: str | None, pretrained: str | None) -> Key:
    """OpenAI weights are QuickGELU models, so 'X' and 'X-quickgelu' name the same 'openai' clip_model."""
    n, p = canonical(name, pretrained)
    return (n.removesuffix("-quickgelu") if p == "openai" else n, p)


@dataclass
class DenseInput:
    """A dense request's image, normalised and padded, and where its patches land."""

    x: torch.Tensor  # (1, 3, Hp, Wp)
    geom: dense.Geometry
    texts: list[str]  # similarity: the text, then the negatives


class _DenseRoute(Route):
    """extract and similarity: images of one padded size share a forward through the ViT."""

    def channels(self, model: clip_model.ClipModel, request: ClipExtractRequest) -> int:
        """Values per patch of the answer (for the response-size check)."""
        return 1

    def texts(self, request: ClipExtractRequest) -> list[str]:
        """Texts whose embeddings the answer needs, made in predict with the features."""
        return []

    def check(self, request: ClipExtractRequest | ClipSimilarityRequest) -> None:
        texts = [("text", getattr(request, "text", ""))]
        texts += [(f"negatives[{i}]", t) for i, t in enumerate(getattr(request, "negatives", None) or [])]
        self.api.check_text_length(texts, "text")

    def decode(self, model: clip_model.ClipModel, job: Job) -> DenseInput:
        r = job.request
        geom = dense.plan(
            job.image.size,
            r,
            model.patch_size,
            model.patch_size,
            self.channels(model, r),
            self.api.cfg.limits,
        )
        x = dense.preprocess(
            job.image,
            r.load_size,
            r.center_crop,
            model.patch_size,
            r.padding_mode,
            dense.CLIP_MEAN,
            dense.CLIP_STD,
        )
        return DenseInput(x, geom, self.texts(r))

    def batch_key(self, item: DenseInput) -> Hashable:
        return item.x.shape

    def predict(
        self, model: clip_model.ClipModel, items: list[DenseInput]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per input its (gh, gw, D) patch features and its texts' embeddings (similarity)."""
        feats = clip_model.dense_features(model, torch.cat([item.x for item in items])).cpu()
        return [
            (f, clip_model.encode_texts(model, item.texts).cpu() if item.texts else None)
            for f, item in zip(feats, items, strict=True)
        ]


class Extract(_DenseRoute):
    name = "extract"
    request = ClipExtractRequest
    response = ClipExtractResponse
    summary = "Dense CLIP patch features (MaskCLIP)."

    def channels(self, model: clip_model.ClipModel, request: ClipExtractRequest) -> int:
        return 3 if request.ret_pca else model.embed_dim

    def encode(self, job: Job, item: DenseInput, output: tuple[torch.Tensor, None]) -> dict:
        return dense.respond(output[0], item.geom, job.request, job.model_id)


class Similarity(_DenseRoute):
    name = "similarity"
    request = ClipSimilarityRequest
    response = ClipSimilarityResponse
    summary = "Per-patch image-text similarity map."

    def texts(self, request: ClipSimilarityRequest) -> list[str]:
        return [request.text, *(request.negatives or [])]

    def encode(self, job: Job, item: DenseInput, output: tuple[torch.Tensor, torch.Tensor]) -> dict:
        r: ClipSimilarityRequest = job.request
        feats, text = output
        if r.negatives:
            sim = clip_model.relevancy(feats, text[0], text[1:], r.relevancy_temperature)
        else:
            sim = clip_model.similarity(feats, text[0], r.similarity)
        if not r.ret_patches:
            sim = dense.upsample_grid(sim[..., None], item.geom, r.interpolation_mode)[..., 0]
        if r.softmax > 0 and not r.negatives:
            sim = clip_model.spatial_softmax(sim, r.softmax)
        arr = sim.to(torch.float32).numpy()
        return tensor_answer(arr, "similarity_map", r.output_dtype, r.response_format, model=job.model_id)


class EncodeText(Route):
    name = "encode_text"
    request = ClipTextRequest
    response = ClipTextResponse
    summary = "L2-normalised CLIP text embedding."

    def check(self, request: ClipTextRequest) -> None:
        self.api.check_text_length([("text", request.text)], "text")

    def decode(self, model: clip_model.ClipModel, job: Job) -> str:
        return job.request.text

    def predict(self, model: clip_model.ClipModel, texts: list[str]) -> torch.Tensor:
        """All texts of the batch in one forward pass."""
        return clip_model.encode_texts(model, texts).cpu()

    def encode(self, job: Job, text: str, emb: torch.Tensor) -> dict:
        dtype = job.request.output_dtype
        data, shape = encode_array(emb.numpy(), dtype)
        return {"text_embedding": data, "shape": shape, "dtype": dtype, "model": job.model_id}


class Embed(VectorsRoute):
    request = ClipEmbedRequest
    response = ClipEmbedResponse
    summary = "L2-normalised image and text embeddings in one space (open_clip encode_image / encode_text)."
    embeds_texts = True

    def check(self, request: ClipEmbedRequest) -> None:
        check_count(
            len(request.images) + len(request.texts), self.api.cfg.limits, "images", "images and texts"
        )
        self.api.check_text_length([(f"texts[{i}]", t) for i, t in enumerate(request.texts)], "texts")

    def encode_images(self, model: clip_model.ClipModel, pixels: torch.Tensor) -> torch.Tensor:
        return clip_model.encode_images(model, pixels)

    def encode_texts(self, model: clip_model.ClipModel, texts: list[str]) -> torch.Tensor:
        return clip_model.encode_texts(model, texts)

    def count_tokens(self, model: clip_model.ClipModel, texts: list[str]) -> list[int]:
        return clip_model.count_tokens(model, texts)

    def family_answer(self, job: Job, vectors: Vectors) -> dict:
        dtype = job.request.output_dtype
        image_data, image_shape = encode_array(vectors.images.numpy(), dtype)
        text_data, text_shape = encode_array(vectors.texts.numpy(), dtype)
        return {
            "image_embeddings": image_data,
            "image_shape": image_shape,
            "text_embeddings": text_data,
            "text_shape": text_shape,
            "dtype": dtype,
            "model": job.model_id,
        }


@dataclass
class ClassifyInput:
    pixels: torch.Tensor  # (3, H, W), the model's own transform
    prompts: list[str]  # label x template, label-major
    n_labels: int


class Classify(Route):
    name = "classify"
    request = ClipClassifyRequest
    response = ClipClassifyResponse
    summary = "Zero-shot label probabilities of one image (prompt templates, softmax at the logit scale)."

    def check(self, request: ClipClassifyRequest) -> None:
        check_count(len(request.labels), self.api.cfg.limits, "labels", "labels")
        self.api.check_text_length([(f"labels[{i}]", t) for i, t in enumerate(request.labels)], "labels")
        templates = request.templates or []
        self.api.check_text_length([(f"templates[{i}]", t) for i, t in enumerate(templates)], "templates")

    def decode(self, model: clip_model.ClipModel, job: Job) -> ClassifyInput:
        r: ClipClassifyRequest = job.request
        templates = r.templates or list(clip_model.DEFAULT_TEMPLATES)
        return ClassifyInput(
            model.preprocess(job.image), clip_model.prompts(r.labels, templates), len(r.labels)
        )

    def predict(
        self, model: clip_model.ClipModel, items: list[ClassifyInput]
    ) -> list[tuple[torch.Tensor, float]]:
        """The batch's images in one forward, its distinct prompts in chunks (cached): per
        input its (L,) logits and the model's logit scale."""
        images = clip_model.encode_images(model, torch.stack([item.pixels for item in items])).cpu()
        vectors = self._prompt_embeddings(model, [t for item in items for t in item.prompts])
        scale = float(model.model.logit_scale.detach().float().exp())
        out = []
        for image, item in zip(images, items, strict=True):
            labels = clip_model.class_embeddings(
                torch.stack([vectors[t] for t in item.prompts]), item.n_labels
            )
            out.append((clip_model.zero_shot_logits(model, image, labels), scale))
        return out

    def encode(self, job: Job, item: ClassifyInput, output: tuple[torch.Tensor, float]) -> dict:
        logits, scale = output
        return {
            "labels": job.request.labels,
            "probabilities": torch.softmax(logits, dim=0).tolist(),
            "logits": logits.tolist(),
            "logit_scale": scale,
            "templates": len(item.prompts) // item.n_labels,
            "model": job.model_id,
        }

    def _prompt_embeddings(self, model: clip_model.ClipModel, texts: list[str]) -> dict[str, torch.Tensor]:
        """Normalised embeddings of the distinct ``texts``: cached ones reused, the others made
        in chunks of ``limits.max_embed_inputs`` and cached."""
        found: dict[str, torch.Tensor] = {}
        missing = []
        for text in dict.fromkeys(texts):
            vector = model.prompt_cache.get(text)
            if vector is None:
                missing.append(text)
            else:
                found[text] = vector
        size = self.api.cfg.limits.max_embed_inputs
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
            for text, vector in zip(chunk, clip_model.encode_texts(model, chunk).cpu(), strict=True):
                found[text] = vector.clone()  # not a view that keeps the whole chunk alive
                model.prompt_cache.put(text, found[text])
        return found


class ClipAPI(FamilyAPI):
    family = "clip"
    selector = ClipModelSelector
    model_key = staticmethod(clip_key)
    routes = (Extract, EncodeText, Similarity, Embed, Classify)

    def load_model(self, entry: ModelEntry) -> clip_model.ClipModel:
        return clip_model.load_clip(entry, self.torch_device, self.compute_dtype)

    def extra_stats(self) -> dict:
        return {"prompt_cache": {k: m.prompt_cache.stats() for k, m in self._models.items()}}
