"""Folder commands: one request per image of a folder, several in flight, retried, resumable.

What every folder command shares (``python -m clients.<family>_client <command> DIR ...``):

* :func:`list_images`: the folder's images, recursively, in a stable (sorted) order;
* :class:`Journal`: ``<output>.progress.jsonl``, one line per finished image, appended as each
  one finishes, so a command that is killed and run again skips what is done (a line cut short
  by the kill is ignored); the output file is then written whole from the journal;
* :func:`run`: the requests over a thread pool with a progress bar; failures of the server or
  the network (connection errors, timeouts, 429, 5xx) are retried with a growing pause, a 4xx
  is the image's own fault and fails it at once; each failure is printed, and the caller exits
  non-zero listing them (:func:`report`);
* :func:`coco_instances`: a COCO instances file (pycocotools ``COCO()`` and ``loadRes``), and
  :func:`save_embeddings`: an ``.npy`` of rows plus the file list in row order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import requests

from .common import VisionServeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def list_images(root: str | Path) -> list[Path]:
    """The image files under ``root`` (by suffix, recursively), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"{root} is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every folder command has."""
    parser.add_argument("--workers", type=int, default=4, help="requests in flight (the server batches them)")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries of a request the server or network failed"
    )
    parser.add_argument("--base-url", default=None, help="default: servers.yaml <family>.base_url")
    parser.add_argument("--api-key", default=None, help="default: servers.yaml or $VISIONSERVE_API_KEY")
    parser.add_argument("--restart", action="store_true", help="forget earlier progress and redo every image")


class Journal:
    """``<output>.progress.jsonl``: the records of finished images, keyed by their path relative
    to the folder. Appended one line per image and flushed, so a killed run loses at most the
    line it was writing."""

    def __init__(self, output: str | Path, restart: bool = False):
        self.path = Path(f"{output}.progress.jsonl")
        self.records: dict[str, dict] = {}
        if restart:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            complete, _, cut = self.path.read_text().rpartition("\n")
            if cut:  # the line a kill cut short: dropped, so the next line starts afresh
                self.path.write_text(complete + "\n" if complete else "")
            for line in complete.splitlines():
                record = json.loads(line)
                self.records[record["file"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.path, "a")  # noqa: SIM115 (closed in close())

    def add(self, record: dict) -> None:
        """Record one finished image (``record["file"]`` names it)."""
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()
        self.records[record["file"]] = record

    def close(self) -> None:
        self._out.close()


def retryable(exc: BaseException) -> bool:
    """A failure of the server or the network, which a later try may not meet."""
    if isinstance(exc, VisionServeError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, requests.RequestException)


def run(
    root: Path,
    files: list[Path],
    work: Callable[[Path], dict],
    journal: Journal,
    workers: int,
    retries: int,
    unit: str = "img",
) -> dict[str, str]:
    """``work(file)`` for every file the journal does not have yet; each answer (a JSON-able
    dict) goes to the journal with its ``file``. Returns {file: why} of the images that failed."""
    todo = [f for f in files if f.relative_to(root).as_posix() not in journal.records]
    skipped = len(files) - len(todo)
    failures: dict[str, str] = {}
    from tqdm import tqdm

    def attempt(file: Path) -> dict:
        for n in range(retries + 1):
            try:
                return work(file)
            except Exception as exc:
                if n == retries or not retryable(exc):
                    raise
                time.sleep(min(0.5 * 2**n, 10.0))
        raise AssertionError("unreachable")

    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(total=len(files), initial=skipped, unit=unit, file=sys.stderr) as bar,
    ):
        futures = {pool.submit(attempt, f): f for f in todo}
        for fut in as_completed(futures):
            rel = futures[fut].relative_to(root).as_posix()
            try:
                journal.add({"file": rel, **fut.result()})
            except Exception as exc:  # reported with the others; the run goes on
                failures[rel] = f"{type(exc).__name__}: {exc}"
                tqdm.write(f"{rel}: {failures[rel]}", file=sys.stderr)
            bar.update()
    journal.close()
    print(
        f"{len(todo) - len(failures)} done now, {skipped} done before, {len(failures)} failed",
        file=sys.stderr,
    )
    return failures


def report(failures: dict[str, str], output: Path) -> int:
    """Print where the output is and which images failed; the command's exit status."""
    print(f"wrote {output}", file=sys.stderr)
    if not failures:
        return 0
    print(f"{len(failures)} image(s) failed (run the command again to retry them):", file=sys.stderr)
    for rel, why in sorted(failures.items()):
        print(f"  {rel}: {why}", file=sys.stderr)
    return 1


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- COCO


def xyxy_to_xywh(box: Iterable[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_instances(files: list[str], records: dict[str, dict], categories: list[str], output: Path) -> Path:
    """A COCO instances file from journal records ``{"file", "width", "height", "instances":
    [{"category", "segmentation" (RLE), "bbox" [x, y, w, h], "area", "score"}]}``: images in
    ``files`` order (ids from 1), categories in the given order (ids from 1)."""
    cat_ids = {name: i for i, name in enumerate(categories, start=1)}
    images, annotations = [], []
    for image_id, rel in enumerate((f for f in files if f in records), start=1):
        rec = records[rel]
        images.append({"id": image_id, "file_name": rel, "width": rec["width"], "height": rec["height"]})
        for inst in rec["instances"]:
            if inst["category"] not in cat_ids:
                raise SystemExit(
                    f"{rel} was labelled earlier with the category {inst['category']!r}, which is not "
                    "among this run's; run again with --restart to relabel the folder"
                )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[inst["category"]],
                    "segmentation": inst["segmentation"],
                    "area": float(inst["area"]),
                    "bbox": inst["bbox"],
                    "score": float(inst["score"]),
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": "visionserve folder labels"},
        "images": images,
        "categories": [{"id": i, "name": name, "supercategory": "object"} for name, i in cat_ids.items()],
        "annotations": annotations,
    }
    write_atomically(output, lambda tmp: tmp.write_text(json.dumps(dataset)))
    return output


# ----------------------------------------------------------------------------- embeddings


def vector_record(vector: np.ndarray) -> dict[str, Any]:
    """A journal record of one embedding: float32 values as a list."""
    return {"embedding": np.asarray(vector, dtype=np.float32).tolist()}


def save_embeddings(files: list[str], records: dict[str, dict], output: Path) -> tuple[np.ndarray, list[str]]:
    """``output`` (.npy, (N, D) float32) and ``<stem>.files.txt`` next to it, the file of each
    row, one a line, in ``files`` order (images that failed are left out)."""
    rows = [f for f in files if f in records]
    dim = len(next(iter(records.values()))["embedding"]) if records else 0
    matrix = np.array([records[f]["embedding"] for f in rows], dtype=np.float32).reshape(len(rows), dim)
    write_atomically(output, lambda tmp: np.save(tmp, matrix))
    names = output.with_suffix(".files.txt")
    write_atomically(names, lambda tmp: tmp.write_text("".join(f"{f}\n" for f in rows)))
    return matrix, rows


def rank(matrix: np.ndarray, rows: list[str], query: np.ndarray, top: int) -> list[tuple[str, float]]:
    """The ``top`` rows most similar to ``query`` (cosine), best first."""
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
    scores = matrix @ query / np.where(norms == 0, 1, norms)
    order = np.argsort(-scores, kind="stable")[:top]
    return [(rows[i], float(scores[i])) for i in order]


# ----------------------------------------------------------------------------- commands


def label_command(args: argparse.Namespace, categories: list[str], label_one: Callable[[Path], dict]) -> int:
    """A folder into a COCO instances file (``args.coco``): ``label_one(file)`` answers the
    record :func:`coco_instances` takes for one image."""
    root, output = Path(args.folder), Path(args.coco)
    files = list_images(root)
    journal = Journal(output, args.restart)
    failures = run(root, files, label_one, journal, args.workers, args.retries)
    names = [f.relative_to(root).as_posix() for f in files]
    coco_instances(names, journal.records, categories, output)
    return report(failures, output)


def embed_command(
    args: argparse.Namespace,
    embed_one: Callable[[Path], np.ndarray],
    embed_text: Callable[[str], np.ndarray] | None = None,
) -> int:
    """A folder into ``args.out`` (.npy rows) and its file list; with ``args.text`` (and
    ``embed_text``), the folder's ``args.top`` best matches for that text, printed best first."""
    root, output = Path(args.folder), Path(args.out)
    files = list_images(root)
    journal = Journal(output, args.restart)
    failures = run(root, files, lambda f: vector_record(embed_one(f)), journal, args.workers, args.retries)
    names = [f.relative_to(root).as_posix() for f in files]
    matrix, rows = save_embeddings(names, journal.records, output)
    if getattr(args, "text", None) and embed_text is not None and rows:
        for name, score in rank(matrix, rows, embed_text(args.text), args.top):
            print(f"{score:.4f}\t{name}")
    return report(failures, output)


def add_embed_arguments(parser: argparse.ArgumentParser, text: bool) -> None:
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument(
        "--out", required=True, help="the .npy of embeddings; <stem>.files.txt lists its rows"
    )
    if text:
        parser.add_argument("--text", default=None, help="also rank the folder by this text (cosine)")
        parser.add_argument("--top", type=int, default=10, help="how many best matches --text prints")
    add_common_arguments(parser)
