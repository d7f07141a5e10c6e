#!/usr/bin/env bash
# Lint the deployment files (what .ci/run runs): hadolint on the Dockerfile, kubernetes-validate
# (offline schemas) on deploy/k8s, checkov on the Dockerfile, the manifests and, for secrets,
# everything under deploy/ plus docker-compose.yml. The tools live in .venv-lint
# (scripts/install.sh test): checkov's dependencies conflict with the server's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv-lint/bin
echo "== hadolint Dockerfile"
"$bin/hadolint" Dockerfile && echo "no findings"
echo "== kubernetes-validate --strict deploy/k8s (Kubernetes 1.29 and 1.37 schemas)"
for version in 1.29 1.37; do
    "$bin/kubernetes-validate" --strict --quiet -k "$version" deploy/k8s/*.yaml
done
# podmonitor.yaml is a Prometheus Operator CRD, which has no offline schema (a WARN above):
# tests/e2e/test_deploy.py checks it against the Deployment.
echo "all $(ls deploy/k8s/*.yaml | wc -l) files valid"
# --skip-download: no call to Prisma Cloud (CI has no internet). CKV_K8S_43 (image by digest):
# the image is built and pushed by whoever deploys; they pin its digest in deployment.yaml.
echo "== checkov"
"$bin/checkov" --quiet --compact --skip-download --framework dockerfile -f Dockerfile
"$bin/checkov" --quiet --compact --skip-download --framework kubernetes -d deploy/k8s --skip-check CKV_K8S_43
"$bin/checkov" --quiet --compact --skip-download --framework secrets -d deploy -f docker-compose.yml -f Dockerfile
echo "secrets scan of deploy/, docker-compose.yml, Dockerfile: nothing found"
echo "checkov: no failed check"
