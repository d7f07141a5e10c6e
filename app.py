"""visionserve launch script: ``python app.py --config configs/demo.yaml [--devices 4 ...]``.

Spawned model workers re-import this file, so everything that starts things stays under the
``__main__`` guard.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS_ENV = "VISIONSERVE_API_KEYS"
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_host(text: str) -> str:
    """``--host``: an IPv4 or IPv6 address (``[::1]`` too) or a host name (RFC 1123 labels).

    Only the syntax is checked here; an address that is not this machine's, or a name that does
    not resolve, fails when the server binds, before any model loads."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not an IPv6 address: {e}") from None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if labels[-1].isdigit():  # looks like a mistyped IPv4 address, not a name
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid IPv4 address")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an IP address nor a host name (letters, digits and '-' in "
            "dot-separated labels of 1-63 characters), e.g. 0.0.0.0, ::, 10.0.0.5 or gpu1.internal"
        )
    return host


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="visionserve", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default=os.environ.get("VISIONSERVE_CONFIG", str(HERE / "configs" / "default.yaml")),
        help="YAML config: models, weights, batching, limits (default: configs/default.yaml; "
        "configs/demo.yaml runs offline with random weights)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        type=parse_host,
        help="address or host name to listen on: 0.0.0.0 (every IPv4 interface), :: (every "
        "interface), one interface's address, or a name (default: 127.0.0.1, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--metrics-port",
        type=int,
        help="also serve /metrics WITHOUT a key on this port, and nothing else (overrides the "
        "config's metrics_port; for Prometheus inside a cluster)",
    )
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--devices", default="auto", help="GPU count, a list like 0,2, or auto (ignored on CPU)")
    p.add_argument("--workers-per-device", type=int, default=1, help="model workers per device and family")
    p.add_argument("--models", help="comma-separated families to serve (default: all enabled in the config)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (auto: float32 on CPU, bfloat16/float16 on CUDA)",
    )
    p.add_argument(
        "--api-key", action="append", default=[], help=f"accepted key (repeatable; also ${KEYS_ENV})"
    )
    p.add_argument("--api-key-file", help="file with one accepted key per line (# comments allowed)")
    p.add_argument("--no-auth", action="store_true", help="serve WITHOUT keys (trusted networks only)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait in a queue")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish before stopping (new ones get 503)",
    )
    p.add_argument(
        "--cache-size",
        type=int,
        help="image embeddings kept per model and worker by caching families (SAM 2); overrides the config",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default=os.environ.get("VISIONSERVE_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text lines, or one JSON object per line (time, level, logger, message, request_id, pid)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch every configured model's weights into the hub cache (or --weights-dir), then exit",
    )
    p.add_argument(
        "--weights-dir",
        default=os.environ.get("VISIONSERVE_WEIGHTS_DIR"),
        help="hub cache folder for downloaded weights (default: the Hugging Face cache, $HF_HUB_CACHE); "
        "give the same one when serving",
    )
    return p.parse_args(argv)


def parse_devices(text: str) -> int | list[int] | str:
    if text == "auto":
        return text
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    return int(text)


def collect_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if args.api_key_file:
        for line in Path(args.api_key_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    return keys


def fetch_weights(cfg, log: logging.Logger) -> tuple[dict[str, str], list[str]]:
    """Every enabled family's weights on this machine, downloaded where missing (apis/downloads.py).
    Returns the optional families left out with the reason (now disabled in ``cfg``) and the
    required ones that cannot start."""
    from apis.downloads import WeightsUnavailable, fetch_family

    unavailable: dict[str, str] = {}
    failed: list[str] = []
    for name, fam in cfg.families().items():
        try:
            fetch_family(name, fam)
        except WeightsUnavailable as e:
            if fam.required:
                log.error("%s", e)
                failed.append(name)
            else:
                log.warning("%s", "!" * 78)
                log.warning("%s WILL NOT BE SERVED (required: false): %s", name.upper(), e)
                log.warning("%s", "!" * 78)
                fam.enabled = False
                unavailable[name] = str(e)
    return unavailable, failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.weights_dir:  # before huggingface_hub is imported: it reads the variable once
        os.environ["HF_HUB_CACHE"] = str(Path(args.weights_dir).resolve())
    os.environ["VISIONSERVE_LOG_FORMAT"] = args.log_format  # the workers' format too
    from apis.config import load_config
    from apis.core.logs import configure_logging
    from apis.core.process import reuse_freed_memory
    from apis.core.settings import CachedFamily
    from apis.http.middleware import install_sigterm_drain
    from apis.server import CommandLine, build_server, close_dispatchers, random_weight_models

    configure_logging(args.log_level, args.log_format)
    # the HTTP process moves multi-MB bodies and answers too
    reuse_freed_memory()
    log = logging.getLogger("visionserve")
    cfg = load_config(args.config)
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        unknown = wanted - set(cfg.families())
        if unknown:
            log.error(
                "--models names %s, not enabled in %s (enabled: %s)",
                ", ".join(sorted(unknown)),
                args.config,
                ", ".join(cfg.families()) or "none",
            )
            return 2
        for name in cfg.families():
            if name not in wanted:
                getattr(cfg, name).enabled = False
    if args.metrics_port is not None:
        cfg.metrics_port = args.metrics_port
    if cfg.metrics_port == args.port:
        log.error("the metrics port must differ from --port (%d)", args.port)
        return 2
    if args.cache_size is not None:
        if args.cache_size < 0:
            log.error("--cache-size must be 0 (off) or more, got %d", args.cache_size)
            return 2
        for fam in cfg.families().values():
            if isinstance(fam, CachedFamily):
                fam.cache_size = args.cache_size

    unavailable, failed = fetch_weights(cfg, log)
    if args.download:
        for name in cfg.families():
            log.info("%s: weights ready", name)
        for name in unavailable:
            log.warning("%s: weights NOT fetched (optional, the server will start without it)", name)
        if failed:
            log.error("weights missing for required families: %s", ", ".join(failed))
        return 1 if failed else 0
    if failed:
        log.error("startup failed: required families without weights: %s (see above)", ", ".join(failed))
        return 1
    if not cfg.families():
        log.error("not starting: no family left to serve (%s unavailable, see above)", ", ".join(unavailable))
        return 1

    if args.no_auth:
        keys = None
        log.warning("AUTH DISABLED (--no-auth): anyone who can reach port %d can use this server", args.port)
    else:
        try:
            keys = collect_keys(args)
        except OSError as e:
            log.error("cannot read --api-key-file: %s", e)
            return 2
        if not keys and args.api_key_file:
            # A key file that holds none is a deployment mistake (an unfilled Secret): a generated
            # key would differ on every replica.
            log.error(
                "--api-key-file %s holds no key: put one per line (# starts a comment)", args.api_key_file
            )
            return 2
        if not keys:
            keys = ["vs-" + secrets.token_urlsafe(24)]
            print(
                f"No API key configured; generated one for this run (not stored anywhere):\n  {keys[0]}",
                file=sys.stderr,
                flush=True,
            )
    opts = CommandLine(
        accelerator=args.accelerator,
        devices=parse_devices(args.devices),
        workers_per_device=args.workers_per_device,
        dtype=args.dtype,
        api_keys=keys,
        queue_timeout=args.timeout,
        log_level=args.log_level,
        host=args.host,
        unavailable=unavailable,
    )
    try:
        server = build_server(cfg, opts)
    except RuntimeError as e:  # the metrics port cannot be had
        log.error("startup failed: %s", e)
        return 1

    for name, fam in cfg.families().items():
        for m in fam.models:
            log.info("%s model %s/%s: weights %s", name, m.name, m.pretrained, m.weights_source)
    if random_weight_models(cfg):
        log.warning(
            "RANDOM WEIGHTS for %s: outputs are meaningless (demo/testing only)",
            ", ".join(random_weight_models(cfg)),
        )
    log.info(
        "serving %s on http://%s:%d (%s)",
        ", ".join(cfg.families()),
        args.host,
        args.port,
        "no auth" if keys is None else f"{len(keys)} bearer key(s)",
    )
    if unavailable:
        log.warning(
            "NOT serving %s: weights unavailable (see above, /health and /info)", ", ".join(unavailable)
        )

    # SIGTERM drains the requests in flight, then takes Ctrl-C's path: workers terminated,
    # manager stopped, port released.
    install_sigterm_drain(server.drain, args.drain_timeout)
    code = 0
    try:
        server.run(
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            # json: uvicorn's own lines (access log included) go through our handler too
            **({"log_config": None} if args.log_format == "json" else {}),
        )
    except (RuntimeError, KeyboardInterrupt) as e:
        if isinstance(e, RuntimeError):
            log.error("startup failed: %s", e)
            code = 1
        server.kill_workers()
    close_dispatchers(server)
    logging.shutdown()
    # The HTTP servers are non-daemon threads that never return on their own; the workers and
    # the manager are already gone, so leave now (this also releases the port).
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
