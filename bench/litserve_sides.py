"""The same family models served by plain LitServe 0.2.19, for the three-sided benchmarks.

    python -m bench.litserve_sides --config configs/demo.yaml --families clip --port 8000
    python -m bench.litserve_sides ... --fast-queue      # LitServe's ZeroMQ transport

One plain ``ls.LitAPI`` per route at ``/<family>/<op>`` (LitServe sends a path to one API's
workers, so each route has its own worker and model copy). LitServe runs every hook in the
worker: ``decode_request`` takes the JSON body, validates it with the route's request model and
builds the job as ours does in its HTTP process; ``predict`` is the family's batch path (the
image decode, the model, the answer rendered as ours renders it); ``encode_response`` returns
it as a ``Response`` that LitServe's endpoint hands to uvicorn without re-serialising. Its best
configuration here: the family's batch size and timeout, one HTTP server in a thread of the main
process (as ours), gzip removed (as ours), the same queue timeout. No auth, no body limit, no
request-id middleware: those are ours only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.harness  # noqa: E402, F401  (workers' thread settings before torch loads)

# isort: split
import litserve as ls  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from starlette.middleware.gzip import GZipMiddleware  # noqa: E402


class Family:
    """Every contact with visionserve's internals, in one place: the lead renames them here."""

    def __init__(self, config: str, family: str):
        from apis.config import load_config

        self.config, self.family = config, family
        fam = load_config(config).families()[family]
        self.max_batch_size, self.batch_timeout = fam.max_batch_size, fam.batch_timeout
        self.workers = fam.workers_per_device
        self.api: Any = None  # the family's FamilyAPI, made in the worker

    def ops(self) -> list[str]:
        from apis.families import FAMILIES

        return [route.name for route in FAMILIES[self.family].api_class().routes]

    def setup(self, device: str) -> None:
        from apis.config import load_config
        from apis.families import FAMILIES

        self.api = FAMILIES[self.family].api_class()(load_config(self.config))
        self.api.setup(device)

    def decode(self, op: str, body: dict) -> Any:
        """Validation and the job (ours: HTTP process); an APIError answers the request."""
        from apis.core.errors import APIError

        route = self.api.handlers[op]
        try:
            request = route.request.model_validate(body)
        except ValidationError as e:
            raise HTTPException(422, detail=e.errors(include_url=False, include_context=False)) from None
        try:
            return self.api.job_for(route, request)
        except APIError as e:
            return e

    def predict(self, items: list) -> list:
        """The family's batch path (image decode, model, answers rendered) on the jobs; errors
        pass through. One rendered Reply each."""
        from apis.core.replies import Reply

        jobs = [item for item in items if not isinstance(item, Exception)]
        replies = iter(self.api.answer(jobs) if jobs else [])
        return [Reply.of(item) if isinstance(item, Exception) else next(replies) for item in items]

    def render(self, reply: Any) -> Response:
        """The body ours sends, as a Response LitServe passes on as it is."""
        return Response(bytes(reply.body), reply.status, reply.headers, reply.media_type)


class RouteAPI(ls.LitAPI):
    """One route of a family as a plain LitAPI; every hook goes through :class:`Family`."""

    def __init__(self, family: Family, op: str):
        super().__init__(
            max_batch_size=family.max_batch_size,
            batch_timeout=family.batch_timeout,
            api_path=f"/{family.family}/{op}",
        )
        self.family, self.op = family, op

    def setup(self, device: str) -> None:
        self.family.setup(device)

    def decode_request(self, request):
        return self.family.decode(self.op, request)

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def unbatch(self, output: list) -> list:
        return output

    def predict(self, x):
        return self.family.predict(x) if self.max_batch_size > 1 else self.family.predict([x])[0]

    def encode_response(self, output) -> Response:
        return self.family.render(output)


def build(args: argparse.Namespace) -> ls.LitServer:
    apis: list[RouteAPI] = []
    for name in args.families.split(","):
        family = Family(args.config, name)
        ops = family.ops()
        if args.routes:
            ops = [op for op in ops if op in args.routes.split(",")]
        apis += [RouteAPI(family, op) for op in ops]
    server = ls.LitServer(
        apis,
        accelerator=args.accelerator,
        devices=args.devices,
        workers_per_device={api.api_path: api.family.workers or 1 for api in apis},
        timeout=args.timeout,
        fast_queue=args.fast_queue,
        restart_workers=True,
    )
    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]
    return server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--families", required=True, help="comma-separated")
    ap.add_argument("--routes", default=None, help="comma-separated ops (default: all of each family)")
    ap.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ transport")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="as app.py's --timeout")
    ap.add_argument("--api-server", default="thread", choices=["thread", "process"])
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    build(args).run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        api_server_worker_type=args.api_server,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
