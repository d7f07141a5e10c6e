"""Each family's weights on this machine, before any worker starts: the download its registration
names (apis/families.py: open_clip, timm, sam2, sam3 through the Hugging Face hub) or an
``hf://`` file, and errors that say what to do (a gated repo, a missing token, offline without the files)."""

from __future__ import annotations

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
from apis.families import FAMILIES


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
        return FAMILIES[family].download(entry)
    except WeightsUnavailable:
        raise
    except Exception as e:
        text = explain(e, family, entry)
        if text is None:
            raise
        raise WeightsUnavailable(text) from None


def fetch_family(family: str, fam: Family) -> list[str]:
    return [path for entry in fam.models for path in fetch(family, entry)]


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
        hub_repo = FAMILIES[family].hub_repo
        return hub_repo(entry) if hub_repo else None
    except Exception:
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
