"""Background-removal client: ``remove_background(image) -> PIL.Image`` and a folder CLI.

    python -m clients.rmbg_client photos/ cutouts/ --base-url http://host:8000/rmbg --workers 4

The seed's RMBG servers took ``POST /remove {image}`` and answered ``{image}``; so does
``/rmbg/remove``, with ``output``, ``output_format`` and ``threshold`` on top.
"""

from __future__ import annotations

import argparse
import io
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pybase64
from PIL import Image

from .common import VisionServeError, get, post_arguments

__all__ = ["VisionServeError", "health", "remove_background", "remove_background_response"]

FAMILY = "rmbg"


def health(base_url: str | None = None, api_key: str | None = None) -> dict:
    return get(FAMILY, "health", base_url, api_key)


def remove_background_response(
    image: Any = None,
    output: str = "rgba",
    output_format: str = "png",
    threshold: float | None = None,
    model: str | None = None,
    *,
    image_url: str | None = None,
    image_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """The server's answer as it came: ``image`` and/or ``mask`` (base64), ``width``, ``height``.
    ``image`` here is base64 text or anything ``encode_image`` takes (path, bytes, PIL, array)."""
    return post_arguments(FAMILY, "remove", locals(), drop_none=True)


def remove_background(image: Any, output: str = "rgba", **kwargs) -> Image.Image:
    """The cut-out (RGBA: the input's colours, the predicted alpha) or, with ``output="mask"``,
    the matte (mode L). ``image``: a file path, PIL image, uint8 array or bytes. Other keyword
    arguments as :func:`remove_background_response`."""
    if output not in ("rgba", "mask"):
        raise ValueError("output must be 'rgba' or 'mask' (remove_background_response gives both)")
    if isinstance(image, str):
        image = Path(image)  # a path here, never base64
    r = remove_background_response(image, output=output, **kwargs)
    picture = Image.open(io.BytesIO(pybase64.b64decode(r["image" if output == "rgba" else "mask"])))
    picture.load()
    return picture


def _process_folder(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .folders import list_images

    src, dst = Path(args.input), Path(args.output)
    files = list_images(src)
    suffix = "." + args.format
    todo = [(f, dst / f.relative_to(src).with_suffix(suffix)) for f in files]
    if not args.overwrite:
        todo = [(f, out) for f, out in todo if not out.exists()]
    options = {
        "output": args.mode,
        "output_format": args.format,
        "threshold": args.threshold,
        "base_url": args.base_url,
        "api_key": args.api_key,
    }

    def one(src_file: Path, out_file: Path) -> None:
        picture = remove_background(src_file, **options)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        picture.save(out_file)

    failed = 0
    with ThreadPoolExecutor(args.workers) as pool, tqdm(total=len(todo), unit="img") as bar:
        futures = {pool.submit(one, f, out): f for f, out in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except (VisionServeError, OSError) as e:
                failed += 1
                tqdm.write(f"{futures[fut]}: {e}", file=sys.stderr)
            bar.update()
    print(f"{len(todo) - failed} written to {dst}, {failed} failed, {len(files) - len(todo)} skipped (exist)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Remove the background of every image in a folder.")
    parser.add_argument("input", help="folder of images (searched recursively)")
    parser.add_argument("output", help="folder for the results (same sub-folders)")
    parser.add_argument("--mode", choices=["rgba", "mask"], default="rgba", help="cut-out or matte")
    parser.add_argument("--format", choices=["png", "webp"], default="png")
    parser.add_argument("--threshold", type=float, default=None, help="hard 0/255 alpha above this")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight (the server batches them)")
    parser.add_argument("--base-url", default=None, help="default: servers.yaml rmbg.base_url")
    parser.add_argument("--api-key", default=None, help="default: servers.yaml or $VISIONSERVE_API_KEY")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose result exists")
    return _process_folder(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
