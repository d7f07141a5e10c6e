#!/usr/bin/env bash
# Build the image and run it as deploy/k8s/deployment.yaml runs its container, then check it:
#   - no --init (the server is PID 1), read-only root, the uid/gid of its securityContext, every
#     capability dropped, no-new-privileges, /tmp and /models as its emptyDir and volume, the API
#     keys from a file mounted where the Secret is, the args and ports of the manifest;
#   - /health, Docker's HEALTHCHECK, one request per family (and /v1/embeddings), /metrics
#     scraped the way podmonitor.yaml does (the metrics port, no key), a SIGTERM with requests
#     in flight: they are answered, a new one gets 503, the container exits 0;
#   - a code change rebuilds only the code layers.
# Needs Docker (a running daemon), and the repository's .venv (PyYAML, requests, the clients).
#
#   bash scripts/container_check.sh
#
# Settings (environment):
#   VARIANT=cpu|cuda        the image's variant (Dockerfile); cuda runs on the CPU here too
#   TORCH_INDEX_URL         the CPU variant's torch index (Dockerfile build arg)
#   LOCAL_INDEXES="DIR..."  PEP 503 folders (DIR/simple/...) served on 127.0.0.1 to the build as
#                           extra indexes, where the torch index or PyPI's CUDA wheels cannot be
#                           reached; the lock's hashes still decide which files are accepted
#   LOCAL_INDEX_PORT        they listen on the ports after this one (default 38100)
#   CHECK_CONFIG            the server config mounted into the container (default
#                           configs/demo.yaml: tiny random models, as no weights can be fetched)
#   BASE_ROOTFS             a debootstrap'ed Debian bookworm to import as the base image when
#                           python:3.11-slim-bookworm cannot be pulled (made here if unset)
#   DEBIAN_MIRROR           debootstrap's mirror (default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
VARIANT=${VARIANT:-cpu}
TAG=visionserve-check:$VARIANT
BASE=python:3.11-slim-bookworm # the Dockerfile's FROM
CHECK_CONFIG=${CHECK_CONFIG:-configs/demo.yaml}
WORK=$(mktemp -d /tmp/container-check.XXXXXX)
NAME=visionserve-check-$$
servers=()
cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    docker volume rm -f "$NAME-models" >/dev/null 2>&1 || true
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.0f}')" "$1" "$(now)"; }

step "docker $(docker version --format '{{.Server.Version}}'), variant $VARIANT, $(nproc) cores"

# --- the base image -----------------------------------------------------------------------------
if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! docker pull -q "$BASE" >/dev/null 2>&1; then
    step "no registry: $BASE made with debootstrap and imported"
    rootfs=${BASE_ROOTFS:-}
    if [ -z "$rootfs" ]; then
        rootfs=$WORK/rootfs
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata \
            bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log"
    fi
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    # pip in the build trusts what this machine trusts (a package proxy's certificate authority)
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
fi

# --- build ----------------------------------------------------------------------------------------
build_args=(--build-arg "VARIANT=$VARIANT")
[ -n "${TORCH_INDEX_URL:-}" ] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
extra=()
port=${LOCAL_INDEX_PORT:-38100} # fixed ports: the build arg is part of the layer cache key
for dir in ${LOCAL_INDEXES:-}; do
    port=$((port + 1))
    python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
    servers+=($!)
    extra+=("http://127.0.0.1:$port/simple")
done
[ ${#extra[@]} -gt 0 ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra[*]}")
# the build context in a folder of its own, so that the code change below leaves the checkout alone
mkdir "$WORK/context"
cp -a Dockerfile .dockerignore app.py pyproject.toml README.md apis clients configs requirements "$WORK/context/"
mkdir "$WORK/context/scripts" && cp scripts/install.sh "$WORK/context/scripts/"
step "docker build (--network host: the local indexes listen on 127.0.0.1)"
t0=$(now)
docker build --network host "${build_args[@]}" -t "$TAG" "$WORK/context" >"$WORK/build.log" 2>&1 ||
    { tail -40 "$WORK/build.log"; exit 1; }
echo "built in $(since "$t0") s; image $TAG: $(docker image inspect -f '{{.Size}}' "$TAG" | numfmt --to=iec-i --suffix=B)"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" | awk -F'\t' '$1 != "0B" {printf "  layer %-8s %s\n", $1, substr($2, 1, 90)}'

step "a code change rebuilds only the code layers"
echo "# rebuilt by container_check.sh" >>"$WORK/context/apis/__init__.py"
t0=$(now)
docker build --network host "${build_args[@]}" -t "$TAG-changed" "$WORK/context" >"$WORK/rebuild.log" 2>&1 ||
    { tail -40 "$WORK/rebuild.log"; exit 1; }
cached=$(grep -c "Using cache" "$WORK/rebuild.log" || true)
echo "rebuilt in $(since "$t0") s; $cached steps from the cache; new layers:"
docker history --format '{{.ID}}\t{{.Size}}\t{{.CreatedBy}}' "$TAG-changed" | head -12 >"$WORK/h2"
docker history --format '{{.ID}}' "$TAG" >"$WORK/h1"
awk -F'\t' 'NR==FNR {old[$1]; next} !($1 in old) && $2 != "0B" {printf "  layer %-8s %s\n", $2, substr($3, 1, 90)}' "$WORK/h1" "$WORK/h2"
docker rmi "$TAG-changed" >/dev/null

# --- the pod, as deployment.yaml describes it ---------------------------------------------------
step "run as deploy/k8s/deployment.yaml's container"
"$PY" - "$WORK/pod.env" <<'EOF'
import shlex, sys, yaml
deployment = next(d for d in yaml.safe_load_all(open("deploy/k8s/deployment.yaml")) if d and d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
(c,) = [c for c in pod["containers"] if c["name"] == "visionserve"]
sec = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
secret_volume = next(v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "visionserve-api-keys")
keys_arg = next(a for a in c["args"] if a.startswith("--api-key-file"))
cpu_limit = str(c["resources"]["limits"]["cpu"])
env = {e["name"]: e.get("value", "") for e in c.get("env", []) if "value" in e}
from_limit = [e["name"] for e in c.get("env", []) if e.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == "limits.cpu"]
assert sec.get("readOnlyRootFilesystem") and sec.get("allowPrivilegeEscalation") is False
assert sec.get("capabilities", {}).get("drop") == ["ALL"]
out = {
    "ARGS": " ".join(shlex.quote(a) for a in c["args"]),
    "RUN_UID": sec["runAsUser"], "RUN_GID": sec.get("runAsGroup", sec["runAsUser"]),
    "HTTP_PORT": ports["http"], "METRICS_PORT": ports.get("metrics", ""),
    "KEYS_DIR": mounts[secret_volume], "KEYS_FILE": keys_arg.split("=", 1)[1].rsplit("/", 1)[1],
    "MODELS_DIR": mounts.get("models", "/models"), "TMP_DIR": mounts.get("tmp", "/tmp"),
    "CPU_LIMIT": cpu_limit, "CPU_ENV": " ".join(from_limit),
    "PLAIN_ENV": " ".join(f"{k}={v}" for k, v in env.items()),
    "INIT_CONTAINERS": " ".join(i["name"] for i in pod.get("initContainers", [])),
}
with open(sys.argv[1], "w") as f:
    f.writelines(f"{k}={shlex.quote(str(v))}\n" for k, v in out.items())
EOF
# shellcheck disable=SC1091
. "$WORK/pod.env"
cpus=$(( $(nproc) < ${CPU_LIMIT%.*} ? $(nproc) : ${CPU_LIMIT%.*} ))
mkdir -m 755 "$WORK/keys" "$WORK/config"
KEY="vs-check-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$KEY" >"$WORK/keys/$KEYS_FILE" && chmod 644 "$WORK/keys/$KEYS_FILE" # a Secret volume's mode
# the config's folder, as a ConfigMap of several keys would be mounted (its model files sit beside it)
cp -r "$(dirname "$CHECK_CONFIG")/." "$WORK/config/" && chmod -R a+rX "$WORK/config"
config_in_pod=/etc/visionserve/config/$(basename "$CHECK_CONFIG")
docker volume create "$NAME-models" >/dev/null
# the volume belongs to the pod's fsGroup in Kubernetes; here: chown it once, as root
docker run --rm --user 0 -v "$NAME-models:/m" --entrypoint /bin/chown "$TAG" "$RUN_UID:$RUN_GID" /m
env_args=(-e "VISIONSERVE_CONFIG=$config_in_pod")
for kv in $PLAIN_ENV; do env_args+=(-e "$kv"); done
for name in $CPU_ENV; do env_args+=(-e "$name=$cpus"); done
publish=(-p "127.0.0.1::$HTTP_PORT")
[ -n "$METRICS_PORT" ] && publish+=(-p "127.0.0.1::$METRICS_PORT")
run=(docker run -d --name "$NAME"
    --user "$RUN_UID:$RUN_GID" --read-only --cap-drop ALL --security-opt no-new-privileges
    --cpus "$cpus" --tmpfs "$TMP_DIR:rw,size=1g,mode=1777"
    -v "$NAME-models:$MODELS_DIR"
    -v "$WORK/keys:$KEYS_DIR:ro" -v "$WORK/config:/etc/visionserve/config:ro"
    "${env_args[@]}" "${publish[@]}" "$TAG")
# shellcheck disable=SC2086
eval "set -- $ARGS"
echo "docker run (no --init) ${run[*]:2} $*" | sed "s|$WORK|\$WORK|g"
echo "config: $CHECK_CONFIG, its folder mounted read-only at /etc/visionserve/config (VISIONSERVE_CONFIG=$config_in_pod)"
[ -z "$INIT_CONTAINERS" ] || echo "init containers not run: $INIT_CONTAINERS (the demo models need no download)"
t0=$(now)
"${run[@]}" "$@" >/dev/null
url="http://$(docker port "$NAME" "$HTTP_PORT" | head -1)"
metrics_url=""
[ -z "$METRICS_PORT" ] || metrics_url="http://$(docker port "$NAME" "$METRICS_PORT" | head -1)"

set +e
"$PY" - "$url" "$KEY" "$NAME" "$metrics_url" "$t0" <<'EOF'
"""The checks, one line each; exit 1 if one fails."""
import base64, io, subprocess, sys, threading, time
import numpy as np, requests
from PIL import Image

url, key, name, metrics_url, t0 = sys.argv[1:6]
auth = {"Authorization": f"Bearer {key}"}
failed = []

def check(what, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        failed.append(what)

def docker(*args):
    return subprocess.run(["docker", *args], capture_output=True, text=True).stdout.strip()

deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    try:
        if requests.get(url + "/health", timeout=5).status_code == 200:
            break
    except requests.ConnectionError:
        pass
    if docker("inspect", "-f", "{{.State.Running}}", name) != "true":
        print(docker("logs", "--tail", "40", name)); sys.exit("the container stopped")
    time.sleep(0.5)
check("GET /health 200", requests.get(url + "/health").status_code == 200, f"{time.time() - float(t0):.0f} s after docker run")
cmdline = docker("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ").strip()
check("the server is PID 1 (no init)", "app.py" in cmdline, cmdline)
status = docker("exec", name, "cat", "/proc/1/status")
ids = {l.split(":")[0]: l.split()[1:] for l in status.splitlines() if l.startswith(("Uid", "Gid", "CapEff", "NoNewPrivs"))}
check("uid/gid, no capabilities, no new privileges", ids["CapEff"] == ["0000000000000000"] and ids["NoNewPrivs"] == ["1"],
      f"uid {ids['Uid'][0]} gid {ids['Gid'][0]} CapEff {ids['CapEff'][0]} NoNewPrivs {ids['NoNewPrivs'][0]}")
write = subprocess.run(["docker", "exec", name, "touch", "/app/x"], capture_output=True, text=True)
check("root filesystem read-only", write.returncode != 0, write.stderr.strip())
check("unauthenticated model call refused", requests.post(url + "/clip/encode_text", json={"text": "x"}).status_code == 401)

rng = np.random.default_rng(0)
buf = io.BytesIO(); Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "PNG")
image = base64.b64encode(buf.getvalue()).decode()
calls = {
    "clip /clip/encode_text": ("/clip/encode_text", {"text": "a robot arm"}, lambda a: a["shape"] == [32]),
    "dino /dino/extract": ("/dino/extract", {"image": image}, lambda a: len(a["shape"]) == 3),
    "sam2 /sam2/prompt_mask": ("/sam2/prompt_mask", {"image": image, "point_coords": [[40, 30]], "point_labels": [1]},
                               lambda a: {"masks", "iou_predictions", "low_res_masks"} <= set(a)),
    "sam3 /sam3/predict": ("/sam3/predict", {"image": image, "prompts": ["cat"], "score_threshold": 0, "min_area": 0},
                           lambda a: isinstance(a["results"], list)),
    "rmbg /rmbg/remove": ("/rmbg/remove", {"image": image}, lambda a: (a["width"], a["height"]) == (128, 96)),
    "openai /v1/embeddings": ("/v1/embeddings", {"model": "clip-tiny/random", "input": ["a robot arm"]},
                              lambda a: len(a["data"][0]["embedding"]) == 32),
}
for what, (path, body, good) in calls.items():
    t = time.monotonic()
    r = requests.post(url + path, json=body, headers=auth, timeout=300)
    try:
        answer = r.json()
    except ValueError:
        answer = {}
    check(what, r.status_code == 200 and good(answer), f"{r.status_code} in {time.monotonic() - t:.2f} s"
          + ("" if r.status_code == 200 else f" {r.text[:200]}"))

if metrics_url:
    m = requests.get(metrics_url + "/metrics", timeout=10)  # as podmonitor.yaml scrapes: no key
    lines = [l for l in m.text.splitlines() if l.startswith("visionserve_requests_total") and 'family="clip"' in l]
    check("keyless scrape of the metrics port", m.status_code == 200 and bool(lines), f"{m.status_code}, {len(m.text.splitlines())} lines; " + "; ".join(lines[:2]))
    other = requests.get(metrics_url + "/clip/encode_text", timeout=10).status_code
    check("the metrics port serves nothing else", other == 404, f"GET /clip/encode_text there: {other}")
    check("/metrics on the API port still needs the key", requests.get(url + "/metrics").status_code == 401)
else:
    print("NOTE  deployment.yaml declares no metrics port: /metrics scraped on the API port WITH the key "
          "(a ServiceMonitor/PodMonitor would need the key; see docs/deploy.md)")
    m = requests.get(url + "/metrics", headers=auth, timeout=10)
    check("/metrics with the key", m.status_code == 200 and "visionserve_" in m.text)

health = ""
deadline = time.monotonic() + 120  # HEALTHCHECK --interval=15s
while time.monotonic() < deadline and health != "healthy":
    health = docker("inspect", "-f", "{{.State.Health.Status}}", name)
    time.sleep(1)
check("Docker HEALTHCHECK", health == "healthy", health)

# SIGTERM with requests in flight: what the kubelet sends after preStop
slow = {"image": image, "load_size": 1536}
answers, started = [], threading.Barrier(5)
def call():
    started.wait()
    answers.append(requests.post(url + "/clip/extract", json=slow, headers=auth, timeout=600))
threads = [threading.Thread(target=call) for _ in range(4)]
for t in threads:
    t.start()
started.wait()
time.sleep(1.0)
docker("kill", "--signal", "TERM", name)
t_term = time.monotonic()
time.sleep(0.5)
try:
    late = requests.post(url + "/clip/encode_text", json={"text": "x"}, headers=auth, timeout=30)
    late_status = f"{late.status_code} {late.json()['error']['code']}" if late.status_code != 200 else "200"
except requests.ConnectionError as e:
    late_status = f"connection refused ({type(e).__name__})"
for t in threads:
    t.join()
code = docker("wait", name)
logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
logs = logs.stdout + logs.stderr
drain = [l for l in logs.splitlines() if "SIGTERM: draining" in l or "drained in" in l]
check("SIGTERM drain: requests in flight answered", [a.status_code for a in answers] == [200] * 4, f"{[a.status_code for a in answers]}")
check("SIGTERM drain: a new request refused", late_status.startswith("503") or "refused" in late_status, late_status)
check("SIGTERM drain: exit code 0", code == "0", f"exit {code} {time.monotonic() - t_term:.1f} s after SIGTERM; " + " | ".join(l.split("]: ")[-1] for l in drain))
print(f"\n{len(failed)} failed" if failed else "\nall checks passed")
sys.exit(1 if failed else 0)
EOF
result=$?
set -e
[ $result = 0 ] || docker logs --tail 60 "$NAME" 2>&1 | sed 's/^/  log: /'
exit $result
