"""The litserve release whose internals apis/litserve_internals.py was checked against.

Every override and private name of LitServe that this project touches is in that one module. A
different litserve release may have renamed or changed them without an error at import time, so
this test fails until someone has read the module against the new release and updated
LITSERVE_VERSION (and the pin in pyproject.toml).
"""

from importlib.metadata import version
from pathlib import Path

from apis import litserve_internals
from apis.litserve_internals import LITSERVE_VERSION, VisionServer

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_litserve_is_the_release_the_internals_were_checked_against():
    installed = version("litserve")
    assert installed == LITSERVE_VERSION, (
        f"litserve {installed} is installed, but {litserve_internals.__file__} was checked against "
        f"litserve {LITSERVE_VERSION}: read every override and private name listed in that module's "
        "docstring against the new release, then update LITSERVE_VERSION and the pin in pyproject.toml"
    )


def test_every_overridden_litserver_method_still_exists_in_litserve():
    import litserve

    overridden = {
        name for name, value in vars(VisionServer).items() if callable(value) and not name.startswith("__")
    }
    ours = {"kill_workers", "worker_states"}
    missing = sorted(n for n in overridden - ours if not hasattr(litserve.LitServer, n))
    assert not missing, f"LitServer no longer has {missing}: {litserve_internals.__file__} overrides them"


def test_litserve_s_own_queues_transport_and_poller_are_not_made(tmp_path):
    """Requests travel over apis/transport/: LitServe's request queues, message transport and
    response poller would only burn memory and an idle thread."""
    import asyncio

    from apis.config import load_config
    from apis.server import CommandLine, build_server

    (tmp_path / "c.yaml").write_text(
        "clip:\n  models:\n    - {name: clip-tiny, pretrained: random, weights: random, "
        f"arch_config: {ROOT / 'configs' / 'models' / 'clip-tiny.json'}}}\n"
    )
    server = build_server(load_config(tmp_path / "c.yaml"), CommandLine(accelerator="cpu", devices=1))
    manager = server._init_manager(1)
    try:
        assert server.litapi_request_queues == {} and server._transport is None
        assert server._get_request_queue("/clip") is None

        async def tasks_while_serving() -> set[str]:
            async with server.lifespan(server.app):
                return {t.get_name() for t in asyncio.all_tasks()}

        assert not any("response_queue" in name for name in asyncio.run(tasks_while_serving()))
    finally:
        manager.shutdown()
        for api in server.litapi_connector:
            api.spec.dispatcher.close()
