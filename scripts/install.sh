#!/usr/bin/env bash
# Install visionserve into ./.venv (created if missing).
#   bash scripts/install.sh          server + clients
#   bash scripts/install.sh test     server + clients + test tools
# torch and torchvision go first, as a pair: the PyPI torchvision does not import next to
# other torch builds, and later model packages (sam2) build against the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="server"
[ "${1:-}" = "test" ] && extras="server,test"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "visionserve installed in $(pwd)/.venv"
