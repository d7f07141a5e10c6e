"""The transport floor: uvicorn alone, taking a request body and answering N bytes.

    python -m bench.floor --port 8765     # POST /<N> answers N bytes (GET /health: 0 bytes)

``bench/serving.py`` sends each route's request bytes here and asks for as many bytes as that
route answered: the time this takes is what any server on LitServe's stack (uvicorn with
httptools and uvloop, over loopback TCP) pays before it does anything, so no route can be
faster over HTTP than its in-process time plus this. A bare ASGI app, not FastAPI: the floor
is the stack's, not a framework's.
"""

from __future__ import annotations

import argparse

import uvicorn

_ANSWERS: dict[int, bytes] = {}


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole body, as a route must before it can parse it
        message = await receive()
        more = message.get("more_body", False)
    path = scope["path"].strip("/")
    size = int(path) if path.isdigit() else 0
    body = _ANSWERS.setdefault(size, b"x" * size)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(size).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    # LitServe's defaults: uvloop and httptools when installed, as they are with the server extra
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
