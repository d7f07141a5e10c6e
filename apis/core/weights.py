"""``hf://org/repo/path/file`` weights: single files of the Hugging Face hub, and where the hub
cache keeps them once apis/downloads.py has fetched them at start-up."""

from __future__ import annotations

import re
from dataclasses import dataclass

HF_SCHEME = "hf://"
HUB = "https://huggingface.co"
RESOLVE_PATH = re.compile(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)$")
TOKEN_HINT = (
    "then give this machine a token of that account: `hf auth login`, or HF_TOKEN=hf_... in the environment"
)


class WeightsUnavailable(RuntimeError):
    """A model's weights cannot be had; the message says why and what to do, in one paragraph."""


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str


def parse_hf_uri(uri: str) -> HubFile:
    """``hf://org/repo/path/in/repo`` -> (``org/repo``, ``path/in/repo``)."""
    parts = uri.removeprefix(HF_SCHEME).strip("/").split("/", 2)
    if not uri.startswith(HF_SCHEME) or len(parts) < 3 or not all(parts):
        raise ValueError(f"{uri!r}: a hub file is written hf://<org>/<repo>/<path of the file in the repo>")
    return HubFile(f"{parts[0]}/{parts[1]}", parts[2])


def is_hf_uri(weights: str | None) -> bool:
    return bool(weights) and weights.startswith(HF_SCHEME)


def hub_file(uri: str) -> str:
    """The local path of an ``hf://`` file, downloaded into the hub cache if it is not there."""
    from huggingface_hub import hf_hub_download

    f = parse_hf_uri(uri)
    return hf_hub_download(repo_id=f.repo, filename=f.filename)
