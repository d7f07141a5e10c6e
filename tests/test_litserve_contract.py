"""The litserve release whose internals apis/litserve_internals.py was checked against.

Every override and private name of LitServe that this project touches is in that one module. A
different litserve release may have renamed or changed them without an error at import time, so
this test fails until someone has read the module against the new release and updated
LITSERVE_VERSION (and the pin in pyproject.toml).
"""

from importlib.metadata import version

from apis import litserve_internals
from apis.litserve_internals import LITSERVE_VERSION, VisionServer


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
