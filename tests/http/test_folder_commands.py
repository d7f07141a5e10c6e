"""The folder commands against the demo server: each is killed half way through a folder of
generated images, run again, and must then have done every image once, its output complete and
loadable (pycocotools ``COCO()`` + ``loadRes``, ``numpy.load``), equal to the same requests made
one by one with the client functions; a broken image is a listed failure and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from clients import clip_client, dino_client, sam2_client
from clients.sam3_client import Sam3ServiceClient, decode_instance_mask
from tests.conftest import KEYS, ROOT

N_IMAGES = 12
PROMPTS = "mug,robot arm"
SAM2 = (
    "--preset",
    "coarse",
    "--points-per-side",
    "4",
    "--pred-iou-thresh",
    "0",
    "--stability-score-thresh",
    "0",
)
LOOSE = ("--score-threshold", "0", "--min-area", "0")  # random weights: keep every instance


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Images in two sub-folders, of two sizes and formats; a text file the commands skip."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        h, w = (48, 64) if i % 3 else (40, 40)
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img.save(sub / f"img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}")
    (root / "notes.txt").write_text("not an image")
    return root


def relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


def command(module: str, sub: str, folder: Path, url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"clients.{module}", sub, str(folder), "--base-url", url,
            "--api-key", KEYS[0], *args]  # fmt: skip


def lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}")) if path.exists() else 0


def kill_half_way_then_finish(cmd: list[str], output: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` one request at a time, kill it once some images are done, run it again."""
    journal = Path(f"{output}.progress.jsonl")
    first = subprocess.Popen(
        [*cmd, "--workers", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while lines(journal) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the command finished before it could be killed"
    done = lines(journal)
    assert 2 <= done < N_IMAGES and not output.exists()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{N_IMAGES - done} done now, {done} done before, 0 failed" in second.stderr
    assert lines(journal) == N_IMAGES
    return second


def test_sam3_label_resumes_into_a_coco_file(demo_server, folder, tmp_path):
    out = tmp_path / "labels.json"
    url = demo_server.url + "/sam3"
    kill_half_way_then_finish(
        command("sam3_client", "label", folder, url, "--prompts", PROMPTS, "--coco", str(out), *LOOSE), out
    )
    coco = COCO(str(out))
    names = relative_files(folder)
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == names
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["mug", "robot arm"]
    anns = json.loads(out.read_text())["annotations"]
    assert anns
    results = coco.loadRes(
        [{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns]
    )
    assert len(results.anns) == len(anns)
    client = Sam3ServiceClient(url, KEYS[0])
    for image_id in (1, N_IMAGES):  # the same as asking for each image directly
        direct = client.predict(
            prompts=PROMPTS.split(","),
            return_masks=True,
            image=folder / names[image_id - 1],
            score_threshold=0,
            min_area=0,
        )
        mine = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        # the same instances; a score may differ in the last float32 bits, as images batched
        # together in the worker run other kernels than one image alone
        assert [a["score"] for a in mine] == pytest.approx([r["score"] for r in direct["results"]], abs=1e-6)
        for a, r in zip(mine, direct["results"], strict=True):
            np.testing.assert_array_equal(
                mask_utils.decode(a["segmentation"]).astype(bool), decode_instance_mask(r)
            )
            x1, y1, x2, y2 = r["bbox"]
            assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
            assert coco.cats[a["category_id"]]["name"] == r["prompt"]


def test_sam2_automask_resumes_into_a_coco_file(demo_server, folder, tmp_path):
    out = tmp_path / "masks.json"
    url = demo_server.url + "/sam2"
    cmd = command("sam2_client", "automask", folder, url, "--coco", str(out), *SAM2)
    kill_half_way_then_finish(cmd, out)
    coco = COCO(str(out))
    anns = json.loads(out.read_text())["annotations"]
    assert anns
    coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns])
    assert len(coco.imgs) == N_IMAGES and [c["name"] for c in coco.cats.values()] == ["object"]
    name = relative_files(folder)[3]
    direct = sam2_client.generate_sam2_auto_masks(
        image=folder / name,
        preset="coarse",
        points_per_side=4,
        pred_iou_thresh=0,
        stability_score_thresh=0,
        output_mode="coco_rle",
        base_url=url,
        api_key=KEYS[0],
    )
    mine = coco.loadAnns(coco.getAnnIds(imgIds=[4]))
    assert [a["score"] for a in mine] == [m["predicted_iou"] for m in direct["masks"]]
    assert [a["segmentation"] for a in mine] == [m["segmentation"] for m in direct["masks"]]
    img = coco.imgs[4]
    assert [img["height"], img["width"]] == direct["image_size"]


def test_clip_embed_resumes_and_ranks_by_text(demo_server, folder, tmp_path):
    out = tmp_path / "emb.npy"
    url = demo_server.url + "/clip"
    cmd = command("clip_client", "embed", folder, url, "--out", str(out), "--text", "a red mug", "--top", "5")
    done = kill_half_way_then_finish(cmd, out)
    rows = np.load(out)
    names = out.with_suffix(".files.txt").read_text().splitlines()
    assert names == relative_files(folder) and rows.shape == (N_IMAGES, 32) and rows.dtype == np.float32
    kw = {"base_url": url, "api_key": KEYS[0]}
    direct = np.stack([clip_client.embed_clip([folder / n], **kw)[0][0] for n in names])
    np.testing.assert_allclose(rows, direct, atol=1e-5)
    query = clip_client.embed_clip(texts=["a red mug"], **kw)[1][0]
    scores = rows @ query / np.linalg.norm(rows, axis=1) / np.linalg.norm(query)
    ranked = [line.split("\t") for line in done.stdout.splitlines()]
    assert [n for _, n in ranked] == [names[i] for i in np.argsort(-scores, kind="stable")[:5]]
    np.testing.assert_allclose([float(s) for s, _ in ranked], np.sort(scores)[::-1][:5], atol=1e-4)


def test_dino_embed_resumes(demo_server, folder, tmp_path):
    out = tmp_path / "dino.npy"
    url = demo_server.url + "/dino"
    kill_half_way_then_finish(
        command("dino_client", "embed", folder, url, "--out", str(out), "--pooling", "mean"), out
    )
    rows = np.load(out)
    names = out.with_suffix(".files.txt").read_text().splitlines()
    direct = dino_client.embed_dino([folder / names[5]], pooling="mean", base_url=url, api_key=KEYS[0])
    assert names == relative_files(folder) and rows.shape[0] == N_IMAGES
    np.testing.assert_allclose(rows[5], direct[0], atol=1e-5)


def test_failures_are_listed_and_the_exit_is_non_zero(demo_server, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(src / "good.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    out = tmp_path / "emb.npy"
    cmd = command("clip_client", "embed", src, demo_server.url + "/clip", "--out", str(out), "--retries", "1")
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1
    assert "1 image(s) failed" in first.stderr and "broken.png: VisionServeError: HTTP 400" in first.stderr
    assert out.with_suffix(".files.txt").read_text().splitlines() == ["good.png"]
    # the failure is not recorded as done: the next run tries it again, and only it
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "0 done now, 1 done before, 1 failed" in again.stderr
    unreachable = command(
        "clip_client", "embed", src, "http://127.0.0.1:9/clip", "--out", str(tmp_path / "x.npy")
    )
    down = subprocess.run(
        [*unreachable, "--retries", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert down.returncode == 1 and "2 image(s) failed" in down.stderr and "ConnectionError" in down.stderr


def test_a_journal_line_cut_by_a_kill_is_dropped_and_the_next_starts_afresh(tmp_path):
    from clients.folders import Journal

    journal = Journal(tmp_path / "out.json")
    journal.add({"file": "a.png", "n": 1})
    journal.close()
    with open(tmp_path / "out.json.progress.jsonl", "a") as f:
        f.write('{"file": "b.png", "n"')  # killed mid-line
    journal = Journal(tmp_path / "out.json")
    assert set(journal.records) == {"a.png"}
    journal.add({"file": "c.png", "n": 3})
    journal.close()
    assert set(Journal(tmp_path / "out.json").records) == {"a.png", "c.png"}
    assert Journal(tmp_path / "out.json", restart=True).records == {}
