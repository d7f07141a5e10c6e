"""Memory of the whole server: RSS (and PSS) summed over its process tree, idle after a warm-up
(one image and one text request, or the family's image request) and at peak under 8 concurrent
clients; per family, all five families in one server, and infinity-emb serving the same CLIP.

    python bench/memory.py [--families clip,dino,sam2,sam3,rmbg,all] [--infinity VENV]

visionserve serves ``configs/demo.yaml`` (tiny models for DINO, SAM 2, SAM 3, RMBG) with its CLIP
replaced by open_clip's ViT-B-16 with random weights (~600 MB of float32), one worker each.
infinity-emb (its own virtualenv, as ``bench/peers.py --peer infinity`` installs it; the row is
left out when it is missing) serves the Hugging Face ``CLIPModel`` of the same sizes, random
weights too, that bench/peer_infinity.py builds with that virtualenv's transformers. RSS counts
pages shared between processes once per process (the sum is an upper bound); PSS splits them
(the sum is what the tree adds to the machine). The peak is the largest tree RSS sampled every
50 ms during the load; the last column is what the tree keeps 2 s after it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peer_infinity  # noqa: E402
from bench.harness import ROOT, drive, free_port, running, table  # noqa: E402
from bench.peers import CACHE  # noqa: E402
from bench.serving import photo  # noqa: E402

CONCURRENCY = 8
PER_CLIENT = 3  # requests per client under load
TEXT = "a photo of a robot arm on a table"
CLIP_B16 = {"name": "ViT-B-16", "pretrained": "random", "weights": "random"}


def warm_and_load(family: str, images: list[str]) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(path, body) pairs: the warm-up (one image request, and one text request where the family
    reads text) and the load (new images, so caches do not answer)."""
    image = {
        "clip": ("/clip/embed", lambda im: {"images": [im]}),
        "dino": ("/dino/embed", lambda im: {"images": [im]}),
        "sam2": (
            "/sam2/prompt_mask",
            lambda im: {"image": im, "point_coords": [[320, 240]], "point_labels": [1]},
        ),
        "sam3": ("/sam3/predict", lambda im: {"image": im, "prompts": ["robot"]}),
        "rmbg": ("/rmbg/remove", lambda im: {"image": im}),
    }[family]
    warm = [(image[0], image[1](images[0]))]
    if family == "clip":
        warm.append(("/clip/encode_text", {"text": TEXT}))
    load = [(image[0], image[1](im)) for im in images[1:]]
    if family == "clip":  # half of CLIP's load is text
        load = [
            x
            for pair in zip(
                load, [("/clip/encode_text", {"text": f"{TEXT} {i}"}) for i in range(len(load))], strict=True
            )
            for x in pair
        ]
    return warm, load


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with suppress(FileNotFoundError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def kb(path: str, field: str) -> int:
    """A ``field:`` value in kB from /proc/<pid>/status or smaps_rollup; 0 for a process gone."""
    with suppress(FileNotFoundError, ProcessLookupError, StopIteration), open(path) as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))
    return 0


def rss_mb(pid: int) -> float:
    return kb(f"/proc/{pid}/status", "VmRSS") / 1024


def pss_mb(pid: int) -> float:
    return kb(f"/proc/{pid}/smaps_rollup", "Pss") / 1024


def server_pid(port: int) -> int:
    """The process serving ``port``: the first whose command line names it (a process forked
    from it, as LitServe forks its manager, has the same command line)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with suppress(OSError):
                args = (d / "cmdline").read_bytes().split(b"\0")
                if b"--port" in args and args[args.index(b"--port") + 1] == str(port).encode():
                    found.append(int(d.name))
    if not found:
        raise LookupError(f"no process serves port {port}")
    return min(found)


class Peak:
    """The largest RSS sum over ``pid``'s tree while inside the ``with`` block (50 ms samples)."""

    def __init__(self, pid: int):
        self.pid, self.mb, self._stop = pid, 0.0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.mb = max(self.mb, sum(rss_mb(p) for p in tree(self.pid)))
            time.sleep(0.05)

    def __enter__(self) -> Peak:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    url: str, pid: int, warm: list[tuple[str, dict]], load: list[tuple[str, dict]], headers: dict
) -> dict:
    """Warm up, read the idle tree, then the peak under the load at ``CONCURRENCY``."""
    for path, body in warm:
        r = requests.post(url + path, json=body, headers=headers, timeout=600)
        r.raise_for_status()
    time.sleep(2)  # let the worker's OpenMP threads and the allocator settle
    pids = tree(pid)
    row = {
        "processes": len(pids),
        "http": rss_mb(pid),
        "each": sorted((round(rss_mb(p)) for p in pids[1:]), reverse=True),
        "rss": sum(rss_mb(p) for p in pids),
        "pss": sum(pss_mb(p) for p in pids),
    }
    by_path: dict[str, list[dict]] = {}
    for path, body in load:
        by_path.setdefault(path, []).append(body)
    with Peak(pid) as peak:
        threads = [
            threading.Thread(target=drive, args=(url + path, bodies, max(1, CONCURRENCY // len(by_path))))
            for path, bodies in by_path.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    row["peak"] = peak.mb
    time.sleep(2)
    row["after"] = sum(rss_mb(p) for p in tree(pid))  # what the tree keeps of the load
    return row


def ours(families: list[str], images: list[str], workdir: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["clip"]["models"] = [CLIP_B16]
    for section in cfg.values():  # the tiny architectures' files, named relative to configs/
        for m in section.get("models", []) if isinstance(section, dict) else []:
            if "arch_config" in m:
                m["arch_config"] = str(ROOT / "configs" / m["arch_config"])
    path = workdir / "memory.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    with _ours(path, families, port) as url:
        pid = server_pid(port)
        warm, load = [], []
        for family in families:
            w, ld = warm_and_load(family, images)
            warm += w
            load += ld
        return measure(url, pid, warm, load, {})


@contextmanager
def _ours(config: Path, families: list[str], port: int) -> Iterator[str]:
    cmd = [sys.executable, str(ROOT / "app.py"), "--config", str(config), "--no-auth"]
    with running([*cmd, "--models", ",".join(families), "--port", str(port)], port, timeout=900) as url:
        yield url


def infinity(venv: Path, images: list[str], workdir: Path) -> dict:
    """infinity-emb serving the random CLIP of ViT-B/16 sizes that bench/peer_infinity.py builds."""
    peer_infinity.prepare(venv, workdir)
    port = free_port()
    cmd, env = peer_infinity.command(venv, workdir, port)
    with running(cmd, port, timeout=600, env=env) as url:

        def body(inputs: list[str], modality: str) -> dict:
            return {"model": peer_infinity.SERVED, "input": inputs, "modality": modality}

        uris = [f"data:image/png;base64,{im}" for im in images]
        warm = [("/v1/embeddings", body(uris[:1], "image")), ("/v1/embeddings", body([TEXT], "text"))]
        load = [
            x
            for i, uri in enumerate(uris[1:])
            for x in (
                ("/v1/embeddings", body([uri], "image")),
                ("/v1/embeddings", body([f"{TEXT} {i}"], "text")),
            )
        ]
        return measure(url, server_pid(port), warm, load, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--families", default="clip,dino,sam2,sam3,rmbg,all", help="rows: families, 'all' = all five"
    )
    ap.add_argument(
        "--infinity",
        type=Path,
        default=CACHE / "venvs" / "infinity",
        help="infinity-emb's virtualenv, as bench/peers.py --peer infinity installs it ('' skips)",
    )
    args = ap.parse_args()
    images = [photo(seed=i) for i in range(1 + CONCURRENCY * PER_CLIENT)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.families.split(","):
            fams = ["clip", "dino", "sam2", "sam3", "rmbg"] if name == "all" else [name]
            label = "visionserve, all five" if name == "all" else f"visionserve --models {name}"
            rows.append((label, ours(fams, images, workdir)))
            print(rows[-1], flush=True)
        if str(args.infinity) and (args.infinity / "bin" / "infinity_emb").exists():
            rows.append(("infinity-emb 0.0.78 (clip)", infinity(args.infinity, images, workdir)))
            print(rows[-1], flush=True)
    print(f"\n`python {' '.join(sys.argv)}`; load average {os.getloadavg()[0]:.1f} (2 cores, shared)\n")
    header = ["server", "processes", "HTTP process MB", "other processes MB", "idle RSS MB", "idle PSS MB"]
    header += [f"peak RSS MB (c={CONCURRENCY})", "RSS MB idle after the load"]
    print(
        table(
            header,
            [
                [
                    label,
                    r["processes"],
                    f"{r['http']:.0f}",
                    " + ".join(map(str, r["each"])) or "-",
                    f"{r['rss']:.0f}",
                    f"{r['pss']:.0f}",
                    f"{r['peak']:.0f}",
                    f"{r['after']:.0f}",
                ]
                for label, r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
