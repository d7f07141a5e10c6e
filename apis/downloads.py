"""Each family's weights on this machine, before any worker starts: the library's own download
(open_clip, timm, sam2, sam3 through the Hugging Face hub) or an ``hf://`` file, and errors that
say what to do (a gated repo, a missing token, offline without the files)."""

from __future__ import annotations

import os
from pathlib import Path

from apis.core.settings import Family, ModelEntry
from apis.core.weights import (
    HUB,
    RESOLVE_PATH,
    TOKEN_HINT,
    HubFile,
    WeightsUnavailable,
    hub_file,
    is_hf_uri,
    parse_hf_uri,
)


def fetch(family: str, entry: ModelEntry) -> list[str]:
    """Make sure ``entry``'s weights are on this machine (downloading what is missing) and return
    the local files; nothing for random weights. Raises :class:`WeightsUnavailable`."""
    if entry.is_random:
        return []
    try:
        if is_hf_uri(entry.weights):
            return [hub_file(entry.weights)]
        if entry.weights:
            if not Path(entry.weights).is_file():
                raise WeightsUnavailable(
                    f"{family} model {entry.name}: weights file {entry.weights} does not exist on this "
                    "machine; fix the path in the config, or name a hub file as hf://<org>/<repo>/<file>"
                )
            return [entry.weights]
        return _LIBRARY_DOWNLOADS[family](entry)
    except WeightsUnavailable:
        raise
    except Exception as e:
        text = explain(e, family, entry)
        if text is None:
            raise
        raise WeightsUnavailable(text) from None


def fetch_family(family: str, fam: Family) -> list[str]:
    return [path for entry in fam.models for path in fetch(family, entry)]


# ----------------------------------------------------------------------------- each library's download


def _clip(entry: ModelEntry) -> list[str]:
    import open_clip
    from huggingface_hub import hf_hub_download
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    if entry.name.startswith("hf-hub:"):  # open_clip reads the architecture from the repo too
        repo = entry.name.removeprefix("hf-hub:")
        return [hf_hub_download(repo, "open_clip_config.json"), download_pretrained_from_hf(repo)]
    cfg = open_clip.get_pretrained_cfg(entry.name, entry.pretrained)
    if not cfg:
        raise WeightsUnavailable(
            f"clip model {entry.name}: open_clip has no pretrained weights '{entry.pretrained}' for it "
            "(open_clip.list_pretrained() lists them); or give `weights`: a local file or hf://<org>/<repo>/<file>"
        )
    return [download_pretrained(cfg)]


def _dino(entry: ModelEntry) -> list[str]:
    """timm's order: ``model.safetensors``, else ``pytorch_model.bin`` (``load_state_dict_from_hf``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models import get_pretrained_cfg

    from apis.dino.model import architecture

    name, _ = architecture(entry)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsUnavailable(f"dino model {entry.name}: timm has no hub weights for {name}")
    repo = cfg.hf_hub_id
    if cfg.hf_hub_filename:
        return [hf_hub_download(repo, cfg.hf_hub_filename)]
    try:
        return [hf_hub_download(repo, "model.safetensors")]
    except EntryNotFoundError:  # not on the hub, or offline and not cached: timm then reads this
        return [hf_hub_download(repo, "pytorch_model.bin")]


def _sam2(entry: ModelEntry) -> list[str]:
    from sam2.build_sam import _hf_download

    from apis.sam2.model import hf_repo

    return [_hf_download(hf_repo(entry))[1]]


def _sam3(entry: ModelEntry) -> list[str]:
    from sam3.model_builder import download_ckpt_from_hf

    return [download_ckpt_from_hf()]


def _rmbg(entry: ModelEntry) -> list[str]:
    raise WeightsUnavailable(
        f"rmbg model {entry.name}: give `weights`: hf://briaai/RMBG-2.0/onnx/model.onnx (or RMBG-1.4), "
        "or the path of a local .onnx file"
    )


_LIBRARY_DOWNLOADS = {"clip": _clip, "dino": _dino, "sam2": _sam2, "sam3": _sam3, "rmbg": _rmbg}


# ----------------------------------------------------------------------------- errors in words


def _chain(e: BaseException):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def expected_repo(family: str, entry: ModelEntry) -> str | None:
    """The hub repo the family's library downloads ``entry`` from (None if it cannot tell)."""
    try:
        if is_hf_uri(entry.weights):
            return parse_hf_uri(entry.weights).repo
        if family == "clip":
            import open_clip

            if entry.name.startswith("hf-hub:"):
                return entry.name.removeprefix("hf-hub:")
            # 'org/repo/' or 'org/repo/file', split as open_clip's download_pretrained splits it
            hub = open_clip.get_pretrained_cfg(entry.name, entry.pretrained).get("hf_hub", "")
            return os.path.split(hub)[0] or None
        if family == "dino":
            from timm.models import get_pretrained_cfg

            from apis.dino.model import architecture

            return get_pretrained_cfg(architecture(entry)[0]).hf_hub_id
        if family == "sam2":
            from apis.sam2.model import hf_repo

            return hf_repo(entry)
        if family == "sam3":
            return "facebook/sam3"
    except Exception:
        return None
    return None


def _where(err: BaseException, family: str, entry: ModelEntry) -> HubFile | None:
    """The repo and file of a failed hub call: from the URL it asked for, else from the config."""
    response = getattr(err, "response", None)
    url = str(getattr(response, "url", "") or "")
    m = RESOLVE_PATH.search(url.split("?", 1)[0])
    if m:
        return HubFile(m.group(1), m.group(2))
    repo = getattr(err, "repo_id", None) or expected_repo(family, entry)
    return HubFile(repo, "") if repo else None


def explain(e: BaseException, family: str, entry: ModelEntry) -> str | None:
    """One paragraph for a hub failure anywhere in ``e``'s chain (libraries re-raise their own
    errors from the hub's); None when no hub error is in it."""
    import httpx
    from huggingface_hub import errors

    who = f"{family} model {entry.name}"
    for err in _chain(e):
        where = _where(err, family, entry)
        repo = where.repo if where else "the model's repository"
        file = f" ({where.filename})" if where and where.filename else ""
        page = f"{HUB}/{where.repo}" if where else HUB
        if isinstance(err, errors.GatedRepoError):
            return (
                f"{who}: {repo}{file} is gated on the Hugging Face hub and this machine has no access. "
                f"Accept the licence at {page} with your account, {TOKEN_HINT}."
            )
        if isinstance(err, errors.LocalEntryNotFoundError):
            return (
                f"{who}: {repo}{file} is not in the hub cache and the hub cannot be reached (offline: "
                "HF_HUB_OFFLINE=1, or no network). Run `python app.py --download` (same --config and "
                "--weights-dir) on a machine with internet first. If the repo is gated, accept the licence "
                f"at {page} and {TOKEN_HINT.removeprefix('then ')}."
            )
        if isinstance(err, errors.RepositoryNotFoundError):
            return (
                f"{who}: the hub refused {repo}{file} (401/404): it does not exist, or it is gated or "
                f"private and this machine sends no token that may read it. If it is gated, accept the "
                f"licence at {page}, {TOKEN_HINT}."
            )
        if isinstance(err, errors.EntryNotFoundError):
            return (
                f"{who}: {repo} has no file{file or ' of that name'} (404). Check the model's name and "
                f"`weights` in the config against {page}/tree/main; if the repo is gated, accept the licence "
                f"at {page}, {TOKEN_HINT}."
            )
        if isinstance(err, errors.HfHubHTTPError):
            status = getattr(getattr(err, "response", None), "status_code", "an error")
            return f"{who}: the hub answered {status} for {repo}{file}: {str(err).splitlines()[0]}"
        if isinstance(err, httpx.TransportError):
            return (
                f"{who}: cannot reach the Hugging Face hub for {repo}{file} ({type(err).__name__}: {err}). "
                "Check the network (or HF_ENDPOINT), or run `python app.py --download` where the hub is "
                "reachable and serve with HF_HUB_OFFLINE=1."
            )
    return None
