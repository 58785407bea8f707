#!/usr/bin/env bash
# Pin the project's images by digest in deploy/images/kustomization.yaml, after `docker push`:
#
#   deploy/pin-images.sh REGISTRY GPU_TAG [MLFLOW_TAG]
#   e.g. deploy/pin-images.sh registry.example.com/ml "$(git rev-parse --short=12 HEAD)" 3.17.2
#
# Reads the registry digest of each pushed image (`docker inspect`: RepoDigests is filled by push or pull)
# and writes `newName` + `digest` for both images, so every pod of every later apply runs exactly that
# build. OUT overrides the file written (tests).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 REGISTRY GPU_TAG [MLFLOW_TAG]" >&2
  exit 2
fi
registry=${1%/}
gpu_tag=$2
mlflow_tag=${3:-3.17.2}
out=${OUT:-$(dirname "$0")/images/kustomization.yaml}

digest_of() {  # repository:tag -> sha256:... (the digest the registry holds for it)
  local repo=${1%:*} refs
  refs=$(docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$1") || {
    echo "error: $1 is not a local image; build and push it first (deploy/README.md, step 2)" >&2; exit 1; }
  local ref
  ref=$(grep -m1 "^${repo}@sha256:" <<<"$refs" || true)
  if [[ -z $ref ]]; then
    echo "error: $1 has no digest from $repo; push it first (docker push $1)" >&2
    exit 1
  fi
  echo "${ref#*@}"
}

gpu_digest=$(digest_of "$registry/listener-grpo:$gpu_tag")
mlflow_digest=$(digest_of "$registry/listener-grpo-mlflow:$mlflow_tag")
cat >"$out" <<YAML
# Written by deploy/pin-images.sh from $registry/listener-grpo:$gpu_tag and
# $registry/listener-grpo-mlflow:$mlflow_tag. Shared by deploy/, deploy/job, deploy/job-own-cluster
# and deploy/prestage (components: [.../images]).
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
images:
  - name: listener-grpo-gpu
    newName: $registry/listener-grpo
    digest: $gpu_digest
  - name: listener-grpo-mlflow
    newName: $registry/listener-grpo-mlflow
    digest: $mlflow_digest
YAML
echo "pinned listener-grpo@$gpu_digest and listener-grpo-mlflow@$mlflow_digest in $out"
