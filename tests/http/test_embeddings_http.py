"""Global embeddings end to end: /clip/embed, /clip/classify, /dino/embed and the OpenAI-compatible
/v1/embeddings + /v1/models, through the real server, our clients and the official ``openai``
client; values against open_clip's ``encode_image`` / ``encode_text`` / zero-shot classifier and
timm's ``forward_features`` + pooling, each with the library's own eval transform.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import openai
import pytest
import requests
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from apis.clip.model import DEFAULT_TEMPLATES
from apis.core.errors import APIError
from clients import clip_client as cc
from clients import dino_client as dc
from tests.conftest import CLIP_ARCH, KEYS, ServerProcess

CLIP_ID = "clip-tiny/testfile"
DINO_TINY = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
MAX_INPUTS = 6


@pytest.fixture(scope="module")
def clip_ref(clip_checkpoint):
    """open_clip's model and validation transform, as create_model_and_transforms gives them."""
    open_clip.add_model_config(CLIP_ARCH)
    model, _, preprocess = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(clip_checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer("clip-tiny")


@pytest.fixture(scope="module")
def dino_ref(assets):
    """A tiny timm DINOv2 with 4 registers (so mean pooling must skip 5 prefix tokens), saved as a
    timm state dict; returns (model, timm's eval transform, arch json, weights)."""
    torch.manual_seed(7)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **DINO_TINY)
    with torch.no_grad():  # timm zero-inits some tokens; make every parameter matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    arch = assets / "dino-embed-tiny.json"
    arch.write_text(json.dumps({"architecture": "vit_small_patch14_reg4_dinov2", **DINO_TINY}))
    weights = assets / "dino-embed-tiny.pth"
    torch.save(model.state_dict(), weights)
    cfg = {**timm.data.resolve_model_data_config(model), "input_size": (3, 56, 56)}
    return model, timm.data.create_transform(**cfg, is_training=False), arch, weights


@pytest.fixture(scope="module")
def server(tmp_path_factory, clip_checkpoint, dino_ref):
    _, _, arch, weights = dino_ref
    config = {
        "limits": {"max_embed_inputs": MAX_INPUTS, "max_body_bytes": 4 * 1024 * 1024},
        "inputs": {"url": {"enabled": True, "allowed_hosts": ["127.0.0.1"]}},
        "clip": {
            "max_batch_size": 16,
            "batch_timeout": 0.1,
            "models": [
                {
                    "name": "clip-tiny",
                    "pretrained": "testfile",
                    "weights": str(clip_checkpoint),
                    "arch_config": str(CLIP_ARCH),
                }
            ],
        },
        "dino": {
            "max_batch_size": 16,
            "batch_timeout": 0.1,
            "models": [{"name": "dinov2_embed_tiny", "weights": str(weights), "arch_config": str(arch)}],
        },
    }
    proc = ServerProcess(config, tmp_path_factory.mktemp("embed-server"), ["--api-key", KEYS[0]])
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture
def ckw(server):
    return {"base_url": server.url + "/clip", "api_key": KEYS[0]}


@pytest.fixture
def dkw(server):
    return {"base_url": server.url + "/dino", "api_key": KEYS[0]}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Non-square images of different sizes, so resizing and cropping matter."""
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(45, 61), (90, 40), (56, 56)]
    ]


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def clip_image_ref(clip_ref, imgs) -> np.ndarray:
    model, preprocess, _ = clip_ref
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.stack([preprocess(im) for im in imgs])), dim=-1).numpy()


def clip_text_ref(clip_ref, texts) -> np.ndarray:
    model, _, tokenizer = clip_ref
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()


def info(server) -> dict:
    return requests.get(server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()


def post(server, path: str, body: dict, key: str = KEYS[0]) -> requests.Response:
    return requests.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"})


# ----------------------------------------------------------------------------- /clip/embed


def test_clip_embed_equals_open_clip(images, clip_ref, ckw):
    texts = ["a photo of a dog", "a diagram"]
    img_emb, txt_emb = cc.embed_clip(images, texts, **ckw)
    assert img_emb.shape == (3, 32) and txt_emb.shape == (2, 32)
    np.testing.assert_allclose(img_emb, clip_image_ref(clip_ref, images), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(txt_emb, clip_text_ref(clip_ref, texts), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(img_emb, axis=1), 1.0, atol=1e-5)
    # one space with /clip/encode_text
    np.testing.assert_allclose(txt_emb[0], cc.encode_clip_text_decoded(texts[0], **ckw), atol=1e-6)


def test_clip_embed_images_or_texts_alone_and_float16(images, clip_ref, ckw):
    img_emb, txt_emb = cc.embed_clip(images[:1], **ckw)
    assert txt_emb.shape == (0, 32)
    np.testing.assert_allclose(img_emb, clip_image_ref(clip_ref, images[:1]), rtol=1e-4, atol=1e-5)
    img_emb, txt_emb = cc.embed_clip(texts=["x"], output_dtype="float16", **ckw)
    assert img_emb.shape == (0, 32) and txt_emb.dtype == np.float16
    np.testing.assert_allclose(txt_emb, clip_text_ref(clip_ref, ["x"]), atol=2e-3)
    img_emb, txt_emb = cc.embed_clip(images[:2], ["x"], output_dtype="float16", **ckw)
    assert img_emb.dtype == txt_emb.dtype == np.float16 and img_emb.shape == (2, 32)
    np.testing.assert_allclose(img_emb, clip_image_ref(clip_ref, images[:2]), atol=2e-3)


def embed_forwards(server, family: str) -> dict[int, int]:
    """The family's embed forwards by batch size so far (tests take before/after differences)."""
    sizes = info(server)["families"][family]["workers"][0]["forward_batch_sizes"].get("embed", {})
    return {int(k): v for k, v in sizes.items()}


def shared_a_forward(before: dict[int, int], after: dict[int, int]) -> bool:
    return any(n > 1 and v > before.get(n, 0) for n, v in after.items())


def test_concurrent_clip_embeds_share_forwards(server, images, clip_ref, ckw):
    variants = [Image.fromarray(np.roll(np.asarray(images[0]), i, axis=1)) for i in range(10)]
    before = embed_forwards(server, "clip")
    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(lambda im: cc.embed_clip([im], [f"text {id(im)}"], **ckw)[0], variants))
    np.testing.assert_allclose(np.concatenate(outs), clip_image_ref(clip_ref, variants), rtol=1e-4, atol=1e-5)
    assert shared_a_forward(before, after := embed_forwards(server, "clip")), (before, after)


# ----------------------------------------------------------------------------- /clip/classify


def zero_shot_ref(clip_ref, img, labels, templates) -> np.ndarray:
    model, preprocess, tokenizer = clip_ref
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, labels, templates, use_tqdm=False)
    with torch.no_grad():
        emb = F.normalize(model.encode_image(preprocess(img)[None]), dim=-1)
        return torch.softmax(model.logit_scale.exp() * emb @ weights, dim=-1)[0].numpy()


@pytest.mark.parametrize("templates", [None, ["a photo of {}", "{}, drawn"]])
def test_classify_equals_open_clip_zero_shot(server, images, clip_ref, ckw, templates):
    labels = ["dog", "cat", "red car", "a tree"]
    probs = cc.classify_clip(images[1], labels, templates=templates, **ckw)
    ref = zero_shot_ref(clip_ref, images[1], labels, templates or list(DEFAULT_TEMPLATES))
    np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    body = post(server, "/clip/classify", {"image": png_b64(images[1]), "labels": labels}).json()
    assert body["logit_scale"] == pytest.approx(float(clip_ref[0].logit_scale.detach().exp()))
    assert body["templates"] == len(DEFAULT_TEMPLATES) and body["labels"] == labels


def test_concurrent_classifies_match_one_at_a_time(server, images, clip_ref, ckw):
    labels = ["one", "two", "three"]
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda im: cc.classify_clip(im, labels, **ckw), images * 2))
    for im, out in zip(images * 2, outs, strict=True):
        np.testing.assert_allclose(
            out, zero_shot_ref(clip_ref, im, labels, list(DEFAULT_TEMPLATES)), atol=1e-5
        )
    # the label set asked again reuses the 24 cached prompt embeddings
    np.testing.assert_allclose(cc.classify_clip(images[0], labels, **ckw), outs[0], atol=1e-6)
    cache = info(server)["families"]["clip"]["workers"][0]["prompt_cache"][CLIP_ID]
    assert cache["hits"] >= 24 and cache["size"] >= 24, cache


# ----------------------------------------------------------------------------- /dino/embed


def test_dino_embed_class_token_and_mean_equal_timm(images, dino_ref, dkw):
    model, transform, _, _ = dino_ref
    with torch.no_grad():
        feats = model.forward_features(torch.stack([transform(im) for im in images]))
        cls = model.forward_head(feats, pre_logits=True).numpy()  # timm's class-token output
        mean = model.pool(feats, pool_type="avg").numpy()  # patch tokens only, registers skipped
    np.testing.assert_allclose(cls, feats[:, 0].numpy())
    out = dc.embed_dino(images, **dkw)
    np.testing.assert_allclose(out, cls, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dc.embed_dino(images, pooling="mean", **dkw), mean, rtol=1e-4, atol=1e-5)
    unit = dc.embed_dino(images[:1], normalize=True, **dkw)
    np.testing.assert_allclose(unit[0], cls[0] / np.linalg.norm(cls[0]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_dino_embed_float16_carries_the_float32_values_in_half_the_bytes(
    server, images, dino_ref, dkw, pooling
):
    """``output_dtype``: float16 is the float32 answer rounded (and within 2e-3 of timm's)."""
    model, transform, _, _ = dino_ref
    with torch.no_grad():
        feats = model.forward_features(torch.stack([transform(im) for im in images]))
        want = (feats[:, 0] if pooling == "cls" else model.pool(feats, pool_type="avg")).numpy()
    out32 = dc.embed_dino(images, pooling=pooling, **dkw)
    out16 = dc.embed_dino(images, pooling=pooling, output_dtype="float16", **dkw)
    assert out32.dtype == np.float32 and out16.dtype == np.float16 and out16.shape == want.shape
    np.testing.assert_array_equal(out16, out32.astype(np.float16))
    np.testing.assert_allclose(out16, want, rtol=2e-3, atol=2e-3)
    raw = [
        post(
            server, "/dino/embed", {"images": [png_b64(images[0])], "pooling": pooling, "output_dtype": d}
        ).json()
        for d in ("float32", "float16")
    ]
    assert [r["dtype"] for r in raw] == ["float32", "float16"]
    assert 2 * len(base64.b64decode(raw[1]["embeddings"])) == len(base64.b64decode(raw[0]["embeddings"]))


def test_concurrent_dino_embeds_of_both_poolings(server, images, dino_ref, dkw):
    jobs = [(im, pooling) for im in images for pooling in ("cls", "mean")] * 2
    before = embed_forwards(server, "dino")
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: dc.embed_dino([j[0]], pooling=j[1], **dkw), jobs))
    after = embed_forwards(server, "dino")
    for (im, pooling), out in zip(jobs, outs, strict=True):
        np.testing.assert_allclose(out, dc.embed_dino([im], pooling=pooling, **dkw), atol=1e-5)
    assert shared_a_forward(before, after), (before, after)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [
        ("/clip/embed", {}, 400, "images", "no images and texts given"),
        ("/clip/embed", {"texts": ["t"] * (MAX_INPUTS + 1)}, 400, "images", f"at most {MAX_INPUTS}"),
        ("/clip/embed", {"texts": ["ok", " "]}, 422, "body", "texts[1] is blank"),
        ("/clip/embed", {"images": ["aGVsbG8gd29ybGQ="]}, 400, "images[0]", "not a format this server reads"),
        ("/clip/embed", {"texts": ["a"], "model_name": "ViT-H-14"}, 400, "model_name", "clip-tiny/testfile"),
        ("/dino/embed", {"images": []}, 400, "images", "no images given"),
        ("/dino/embed", {"images": ["x"], "pooling": "max"}, 422, "pooling", "'cls' or 'mean'"),
        (
            "/dino/embed",
            {"images": ["x"], "model_type": "dinov2_vitg14"},
            400,
            "model_type",
            "dinov2_embed_tiny",
        ),
        ("/clip/classify", {"image": "PNG", "labels": []}, 400, "labels", "no labels given"),
        ("/clip/classify", {"image": "PNG", "labels": ["a"] * (MAX_INPUTS + 1)}, 400, "labels", "at most"),
        (
            "/clip/classify",
            {"image": "PNG", "labels": ["a"], "templates": ["a photo"]},
            422,
            "body",
            "no '{}'",
        ),
        ("/clip/classify", {"image": "PNG", "labels": ["a", ""]}, 422, "body", "labels[1] is blank"),
    ],
)
def test_bad_embedding_requests_get_clear_errors(server, images, path, body, status, param, words):
    body = {k: (png_b64(images[0]) if v == "PNG" else v) for k, v in body.items()}
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err


def test_one_bad_image_fails_only_its_request(server, images, clip_ref, ckw):
    corrupt = base64.b64decode(png_b64(images[0]))[:60]  # a valid header, no pixels

    def call(i: int):
        try:
            return cc.embed_clip([images[0] if i else corrupt], **ckw)[0]
        except cc.VisionServeError as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, range(4)))
    assert isinstance(outs[0], cc.VisionServeError) and outs[0].status == 400 and outs[0].param == "images[0]"
    for out in outs[1:]:
        np.testing.assert_allclose(out, clip_image_ref(clip_ref, images[:1]), rtol=1e-4, atol=1e-5)


def test_images_of_one_request_decoded_in_parallel_keep_their_order_and_first_error(
    server, images, clip_ref, ckw
):
    """The worker decodes a request's images on several threads: rows stay in request order, and
    of several broken images the first in the request is the one named."""
    many = [images[i % 3] for i in range(MAX_INPUTS)]
    got, _ = cc.embed_clip(many, **ckw)
    np.testing.assert_allclose(got, clip_image_ref(clip_ref, many), rtol=1e-4, atol=1e-5)
    corrupt = base64.b64decode(png_b64(images[1]))[:60]  # a valid header, no pixels
    with pytest.raises(cc.VisionServeError) as e:
        cc.embed_clip([images[0], images[1], corrupt, corrupt, images[2]], **ckw)
    assert e.value.status == 400 and e.value.param == "images[2]"


# ----------------------------------------------------------------------------- /v1 (OpenAI)


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0)


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(img)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_openai_client_embeddings_equal_clip_embed_and_open_clip(oai, images, clip_ref, ckw, encoding_format):
    texts = ["a photo of a dog", "!!!"]
    inputs = [texts[0], data_uri(images[0]), png_b64(images[1]), texts[1]]
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    res = oai.embeddings.create(model=CLIP_ID, input=inputs, **kwargs)
    if encoding_format == "base64":  # the client hands base64 back as it came
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in res.data])
    else:  # the client asked for base64 itself and decoded it, or the server sent floats
        got = np.array([d.embedding for d in res.data], dtype=np.float32)
    assert [d.index for d in res.data] == [0, 1, 2, 3] and res.model == CLIP_ID
    img_emb, txt_emb = cc.embed_clip(images[:2], texts, **ckw)
    want = np.stack([txt_emb[0], img_emb[0], img_emb[1], txt_emb[1]])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[[1, 2]], clip_image_ref(clip_ref, images[:2]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[[0, 3]], clip_text_ref(clip_ref, texts), rtol=1e-4, atol=1e-5)
    tok = clip_ref[2]  # tokens up to and including the end token, where the text tower pools
    text_tokens = sum(int((tok([t])[0] == tok.eot_token_id).nonzero()[0]) + 1 for t in texts)
    image_tokens = 2 * ((56 // 14) ** 2 + 1)
    assert res.usage.prompt_tokens == res.usage.total_tokens == text_tokens + image_tokens


def test_openai_single_string_and_dino_images(oai, images, dino_ref):
    res = oai.embeddings.create(model=CLIP_ID, input="just one text")
    assert len(res.data) == 1 and len(res.data[0].embedding) == 32
    res = oai.embeddings.create(
        model="DINOv2-embed-tiny", input=[data_uri(im) for im in images], dimensions=64
    )
    model, transform, _, _ = dino_ref
    with torch.no_grad():
        cls = model.forward_features(torch.stack([transform(im) for im in images]))[:, 0]
    want = F.normalize(cls, dim=-1).numpy()  # OpenAI's embeddings have length 1
    np.testing.assert_allclose(np.array([d.embedding for d in res.data]), want, rtol=1e-4, atol=1e-5)
    assert res.model == "dinov2_embed_tiny" and res.usage.prompt_tokens == 3 * (16 + 5)


def test_openai_models_list_and_retrieve(oai):
    assert [m.id for m in oai.models.list()] == [CLIP_ID, "dinov2_embed_tiny"]
    assert oai.models.retrieve(CLIP_ID).id == CLIP_ID
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


def test_openai_errors(server, oai, images):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=CLIP_ID, input="x"
        )
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.code == "model_not_found" and CLIP_ID in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=CLIP_ID, input="x", dimensions=16)
    assert e.value.param == "dimensions" and "32-dimensional" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=CLIP_ID, input=[])
    assert e.value.param == "input" and "empty list" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=CLIP_ID, input=["x"] * (MAX_INPUTS + 1))
    assert e.value.code == "too_many_inputs"
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="dinov2_embed_tiny", input=[data_uri(images[0]), "a text"])
    assert e.value.param == "input[1]" and "images only" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=CLIP_ID, input=[[1, 2, 3]])
    assert "token arrays" in e.value.message


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": CLIP_ID}, 400, "input"),
        ({"model": CLIP_ID, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": CLIP_ID, "input": "x", "temperature": 1}, 400, "temperature"),
        ({"model": CLIP_ID, "input": ["ok", ""]}, 400, "input"),
        ({"model": CLIP_ID, "input": "data:image/png;base64,AAAA"}, 400, "input[0]"),
        ({"model": "nope", "input": "x"}, 404, "model"),
    ],
)
def test_openai_route_errors_have_openai_shape(server, body, status, param):
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert post(server, "/v1/embeddings", {"model": CLIP_ID, "input": "x"}, key="bad").status_code == 401


def test_openai_modality_and_image_urls(oai, image_root, image_host, clip_ref, dino_ref):
    """infinity's clients send ``modality``; with ``image`` an input may be an http(s) URL,
    fetched under the server's URL rules."""
    photo = Image.open(image_root / "photo.png").convert("RGB")
    url = image_host + "/photo.png"
    res = oai.embeddings.create(model=CLIP_ID, input=[url, data_uri(photo)], extra_body={"modality": "image"})
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, clip_image_ref(clip_ref, [photo, photo]), rtol=1e-4, atol=1e-5)
    texts = ["a mug", url]  # with modality text (or none), a URL is a text
    for extra in ({"modality": "text"}, {}):
        res = oai.embeddings.create(model=CLIP_ID, input=texts, extra_body=extra)
        got = np.array([d.embedding for d in res.data], dtype=np.float32)
        np.testing.assert_allclose(got, clip_text_ref(clip_ref, texts), rtol=1e-4, atol=1e-5)
    # an image-only model takes URLs without being told
    res = oai.embeddings.create(model="dinov2_embed_tiny", input=url)
    model, transform, _, _ = dino_ref
    with torch.no_grad():
        want = F.normalize(model.forward_features(transform(photo)[None])[:, 0], dim=-1).numpy()
    np.testing.assert_allclose([res.data[0].embedding], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "inputs", "modality", "param", "words"),
    [
        (CLIP_ID, ["a text", "IMAGE"], "text", "input[1]", "is an image, but modality is 'text'"),
        (CLIP_ID, ["IMAGE", "a text"], "image", "input[1]", "is not an image, and modality is 'image'"),
        ("dinov2_embed_tiny", ["IMAGE"], "text", "modality", "embeds images only"),
        (CLIP_ID, ["http://10.1.2.3/cat.png"], "image", "input[0]", "allow-list"),
        (CLIP_ID, ["ftp://127.0.0.1/cat.png"], "image", "input[0]", "is not an image"),
        (CLIP_ID, ["IMAGE"], "audio", "modality", "'text' or 'image'"),
    ],
)
def test_openai_modality_contradictions_are_400s_naming_the_input(
    oai, images, model, inputs, modality, param, words
):
    inputs = [data_uri(images[0]) if x == "IMAGE" else x for x in inputs]
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=model, input=inputs, extra_body={"modality": modality})
    assert e.value.param == param and words in e.value.message, e.value.message


def test_openai_image_urls_follow_the_servers_url_setting(images):
    from apis.config import ServerConfig
    from apis.openai_routes import EmbeddingsRequest, OpenAIEmbeddings

    routes = OpenAIEmbeddings(ServerConfig(), [])  # image URLs are off by default
    with pytest.raises(APIError) as e:
        routes.image_of("http://example.com/cat.png", "input[3]", urls=True)
    assert e.value.param == "input[3]" and e.value.code == "input_disabled"
    assert EmbeddingsRequest(model="m", input="x", modality="image").modality == "image"


def test_which_openai_inputs_are_images(images):
    from apis.config import ServerConfig
    from apis.openai_routes import image_input

    cfg = ServerConfig()
    png = base64.b64decode(png_b64(images[0]))
    buf = io.BytesIO()
    images[0].save(buf, format="JPEG")
    for image in (png_b64(images[0]), data_uri(images[0]), base64.b64encode(buf.getvalue()).decode()):
        assert image_input(image, cfg, "input[0]")[:4] in (png[:4], buf.getvalue()[:4])
    for text in (
        "hello world",
        "QUJDREVGR0hJSktMTU5PUA==",
        "data: the new oil",
        "data:text/plain;base64,aGk=",
    ):
        assert image_input(text, cfg, "input[0]") is None
    with pytest.raises(APIError) as e:  # announced as an image, so a broken one is an error, not a text
        image_input("data:image/png;base64,aGVsbG8gd29ybGQ=", cfg, "input[2]")
    assert e.value.param == "input[2]" and e.value.code == "invalid_image"
