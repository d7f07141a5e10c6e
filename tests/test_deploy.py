"""Launch interfaces and the deployment files: --host, the console script, key files, and the
settings that docker-compose.yml, deploy/k8s and deploy/nginx must agree on."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import app
from tests.conftest import ROOT, ServerProcess

DEMO = ROOT / "configs" / "demo.yaml"


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("10.1.2.3", "10.1.2.3"),
        ("::", "::"),
        ("::1", "::1"),
        ("[fe80::0001]", "fe80::1"),
        ("2001:db8::5", "2001:db8::5"),
        ("localhost", "localhost"),
        ("gpu-1.cluster.internal", "gpu-1.cluster.internal"),
        ("node7.", "node7."),
    ],
)
def test_host_takes_any_address_or_host_name(text, host):
    assert app.parse_host(text) == host
    assert app.parse_args(["--host", text]).host == host


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.2.3", "not a valid IPv4 address"),
        ("300.1.1.1", "not a valid IPv4 address"),
        ("gpu_1", "neither an IP address nor a host name"),
        ("-gpu.internal", "neither an IP address nor a host name"),
        ("a..b", "neither an IP address nor a host name"),
        ("x" * 64 + ".internal", "neither an IP address nor a host name"),
        ("", "neither an IP address nor a host name"),
        ("http://gpu1", "neither an IP address nor a host name"),
        ("[gpu1]", "is not an IPv6 address"),
    ],
)
def test_host_refuses_what_is_neither(text, message, capsys):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        app.parse_host(text)
    with pytest.raises(SystemExit) as e:
        app.parse_args([f"--host={text}"])
    assert e.value.code == 2 and f"argument --host: {text!r}" in capsys.readouterr().err


def test_an_address_of_no_interface_fails_before_any_model_loads(tmp_path):
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a host, so bind() fails; nothing is sent.
    server = ServerProcess(None, tmp_path, ["--config", str(DEMO), "--models", "clip", "--host", "192.0.2.1"])
    code = server.proc.wait(120)
    log = server.log()
    server.stop()
    assert code == 1, log
    assert (
        f"startup failed: cannot listen on 192.0.2.1 port {server.port}: Cannot assign requested address"
        in log
    )
    assert "models loaded" not in log and "RANDOM WEIGHTS" in log  # config read, no worker started


@pytest.mark.parametrize(
    ("content", "error"),
    [("# only a comment\n\n", "holds no key"), (None, "cannot read --api-key-file")],
)
def test_a_key_file_without_keys_stops_start_up(tmp_path, content, error):
    path = tmp_path / "keys.txt"
    if content is not None:
        path.write_text(content)
    run = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--config", str(DEMO), "--api-key-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and error in run.stderr and str(path) in run.stderr
    assert "generated one" not in run.stderr


def test_console_script_is_app_main():
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    assert re.search(r'^\[project\.scripts\]\n(#.*\n)*visionserve = "app:main"\n\n', pyproject, re.M)
    script = Path(sys.executable).with_name("visionserve")
    if not script.exists():  # a venv installed before the script was declared
        if os.environ.get("CI") == "true":
            pytest.fail(f"{script} is missing: scripts/install.sh installs it")
        pytest.skip(f"{script} is missing: reinstall with `pip install -e .`")
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    direct = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: visionserve ")
    assert "--host HOST" in run.stdout and "--drain-timeout" in run.stdout
    assert run.stdout == direct.stdout


def _k8s(name: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()))


def test_grace_periods_cover_the_drain():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    replica = compose["services"]["visionserve"]
    assert replica["deploy"]["replicas"] >= 2
    assert int(replica["stop_grace_period"].rstrip("s")) > app.parse_args([]).drain_timeout
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in compose["services"]["nginx"]["volumes"]

    (deployment,) = _k8s("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    drain = app.parse_args(container["args"]).drain_timeout
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 10
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = container["startupProbe"]
    assert (
        startup["httpGet"]["path"] == "/health"
        and startup["periodSeconds"] * startup["failureThreshold"] >= 600
    )
    # the key file the args name is where the Secret is mounted
    key_file = Path(app.parse_args(container["args"]).api_key_file)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert key_file.parent == Path(mounts["api-keys"])
    (secret,) = _k8s("secret.yaml")
    assert key_file.name in secret["stringData"]

    (hpa,) = _k8s("hpa.yaml")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "visionserve_requests_in_flight"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    (adapter,) = _k8s("prometheus-adapter.yaml")
    assert "as: visionserve_requests_in_flight" in adapter["data"]["config.yaml"]
