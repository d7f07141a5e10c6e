"""Launch interfaces and the deployment files: --host, the console script, key files, and the
settings that docker-compose.yml, deploy/k8s and deploy/nginx must agree on."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import app
from apis.core.settings import Limits
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


def test_a_taken_metrics_port_fails_before_any_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(
            None, tmp_path, ["--config", str(DEMO), "--models", "clip", "--metrics-port", str(port)]
        )
        code = server.proc.wait(120)
    log = server.log()
    server.stop()
    assert code == 1, log
    assert f"startup failed: cannot listen on 127.0.0.1 port {port}: Address already in use" in log
    assert "models loaded" not in log


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
    # the key file the args name is where the Secret is mounted, under the key that
    # docs/deploy.md's `kubectl create secret` gives it
    key_file = Path(app.parse_args(container["args"]).api_key_file)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert key_file.parent == Path(mounts["api-keys"])
    secret_name = next(v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "api-keys")
    created = re.findall(
        r"create secret generic (\S+) --from-file=(\S+)=", (ROOT / "docs" / "deploy.md").read_text()
    )
    assert (secret_name, key_file.name) in created

    (hpa,) = _k8s("hpa.yaml")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "visionserve_requests_in_flight"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    (adapter,) = _k8s("prometheus-adapter.yaml")
    assert "as: visionserve_requests_in_flight" in adapter["data"]["config.yaml"]


def _applied() -> list[dict]:
    """Every object `kubectl apply -f deploy/k8s/` applies."""
    return [
        doc for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for doc in _k8s(path.name) if doc
    ]


def _pod_and_container() -> tuple[dict, dict, argparse.Namespace]:
    (deployment,) = _k8s("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container, app.parse_args(container["args"])


def test_applying_the_manifests_never_touches_a_secret():
    """docs/deploy.md creates the Secrets with kubectl; a Secret in deploy/k8s would overwrite
    them with a template on every `kubectl apply -f deploy/k8s/` (and every pod would exit 2)."""
    kinds = [doc["kind"] for doc in _applied()]
    assert "Secret" not in kinds and "Kustomization" not in kinds, kinds
    assert not (ROOT / "deploy" / "k8s" / "kustomization.yaml").exists()
    steps = (ROOT / "docs" / "deploy.md").read_text()
    (apply_all,) = re.finditer(r"^kubectl apply -f deploy/k8s/$", steps, re.M)
    # the namespace first, then the Secrets, then the rest
    assert (
        steps.index("kubectl apply -f deploy/k8s/namespace.yaml")
        < steps.index("create secret generic visionserve-api-keys")
        < apply_all.start()
    )


def test_the_hpa_owns_the_replica_count_and_a_rollout_needs_no_spare_gpu():
    (deployment,) = _k8s("deployment.yaml")
    (hpa,) = _k8s("hpa.yaml")
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "visionserve",
    }
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (pdb,) = _k8s("pdb.yaml")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_weights_are_fetched_by_an_init_container():
    pod, container, _ = _pod_and_container()
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"]
    assert app.parse_args(init["args"]).download
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts["models"] == {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["models"]
    assert "nvidia.com/gpu" not in init["resources"]["limits"]  # a download needs no GPU
    assert init["securityContext"]["readOnlyRootFilesystem"] and init["securityContext"]["runAsNonRoot"]


def test_threads_follow_the_cpu_limit_and_liveness_sees_the_event_loop():
    pod, container, args = _pod_and_container()
    env = {e["name"]: e for e in container["env"]}
    ref = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}
    live = container["livenessProbe"]
    assert live["httpGet"] == {"path": "/health", "port": "http"}  # answered by the event loop
    # generous: a drain (503) and a worker's reload do not restart the pod
    assert live["periodSeconds"] * live["failureThreshold"] > args.drain_timeout + 30


def test_timeouts_are_ordered_end_to_end():
    """queue timeout + 60 s of compute <= drain timeout; the proxies wait longer than that; the
    grace periods cover preStop + drain; nothing is retried after a timeout."""
    compute = 60
    pod, container, args = _pod_and_container()
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert args.drain_timeout >= args.timeout + compute
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + args.drain_timeout + 10
    main, canary = _k8s("ingress.yaml")
    notes = main["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= args.timeout + compute
    retry = notes["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
    assert "timeout" not in retry and {"error", "http_503"} <= set(retry)

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["visionserve"]
    local = app.parse_args(compose["command"])
    assert (local.timeout, local.drain_timeout) == (args.timeout, args.drain_timeout)
    assert int(compose["stop_grace_period"].rstrip("s")) >= local.drain_timeout + 10
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    for key in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = re.findall(rf"^\s*{key} (\d+)s;", conf, re.M)
        assert int(value) >= local.timeout + compute
    (retry_line,) = re.findall(r"^\s*proxy_next_upstream (.*);", conf, re.M)
    assert "timeout" not in retry_line.split() and "http_503" in retry_line.split()
    for keepalive in re.findall(r"keepalive_timeout (\d+)s;", conf):
        assert int(keepalive) < 5  # under uvicorn's keep-alive (5 s): nginx never reuses a closed one


def test_ingress_body_limit_is_above_the_servers():
    """The server's JSON 413 is what a client sees, not the controller's HTML one."""
    main, _ = _k8s("ingress.yaml")
    size = main["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) * 2**20 > Limits().max_body_bytes


def test_sam_routes_hash_on_the_image_key_and_nothing_else_does():
    services = {s["metadata"]["name"]: s for s in _k8s("service.yaml")}
    pod_labels = _k8s("deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert set(services) == {"visionserve", "visionserve-images"}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    main, canary = _k8s("ingress.yaml")

    def paths(ingress):
        (rule,) = ingress["spec"]["rules"]
        return {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}

    assert not any("hash" in key for key in main["metadata"]["annotations"])  # round-robin
    assert paths(main) == {"/": "visionserve", "/sam2/": "visionserve", "/sam3/": "visionserve"}
    assert paths(canary) == {"/sam2/": "visionserve-images", "/sam3/": "visionserve-images"}
    notes = {
        k.removeprefix("nginx.ingress.kubernetes.io/"): v
        for k, v in canary["metadata"]["annotations"].items()
    }
    # only requests with a non-empty X-Image-Key take the hashed Service; the rest stay round-robin
    assert notes == {
        "canary": "true",
        "canary-by-header": "X-Image-Key",
        "canary-by-header-pattern": ".+",
        "upstream-hash-by": "$http_x_image_key",
    }
    assert main["spec"]["rules"][0]["host"] == canary["spec"]["rules"][0]["host"]


def test_prometheus_scrapes_the_keyless_metrics_port():
    pod, container, args = _pod_and_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"] != ports["http"] == args.port
    (monitor,) = _k8s("podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    labels = _k8s("deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["metadata"]["namespace"] == "visionserve"
    # the API port only from the ingress controller, the metrics port only from Prometheus
    (policy,) = _k8s("networkpolicy.yaml")
    opened = {
        (rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], p["port"])
        for rule in policy["spec"]["ingress"]
        for p in rule["ports"]
    }
    assert opened == {("ingress-nginx", args.port), ("monitoring", args.metrics_port)}
