#!/usr/bin/env bash
# Guards the gRPC API in proto/ (flashsale.v1): buf lint (STANDARD, exceptions with reasons in
# proto/buf.yaml), then buf breaking (FILE rules) of the working tree's protos against every
# state of proto/ since the commit that added proto/buf.yaml: that commit and each later one
# that changed proto/. Until buf.yaml is committed (or in the commit that adds it), against
# the parent: HEAD, or HEAD^ in that commit. Usage: BUF=path/to/buf .ci/buf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUF="${BUF:-.ci/.tools/node_modules/.bin/buf}"

echo "buf lint: proto/"
"$BUF" lint proto

if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "buf: shallow clone, the API's history is missing (git fetch --unshallow)" >&2
  exit 1
fi
# Old commits are read as they are (some have no buf.yaml): the module is proto/.
layout='{"version":"v2","modules":[{"path":"proto"}]}'
gitdir="$(cd "$(git rev-parse --git-common-dir)" && pwd)"
base="$(git log --diff-filter=A --format=%H -- proto/buf.yaml | tail -n 1)"
against=()
if [ -z "$base" ]; then
  parent=HEAD
elif [ "$base" = "$(git rev-parse HEAD)" ]; then
  parent=HEAD^
else
  parent=
fi
if [ -n "$parent" ] && git rev-parse -q --verify "$parent:proto" >/dev/null; then
  against+=("$(git rev-parse "$parent")")
fi
if [ -n "$base" ]; then
  against+=("$base" $(git rev-list "$base"..HEAD -- proto))
fi

for sha in "${against[@]}"; do
  echo "buf breaking: proto/ against $(git log -1 --format='%h %s' "$sha" | cut -c1-90)"
  if ! "$BUF" breaking proto --against "$gitdir#format=git,ref=$sha" --against-config "$layout"; then
    echo "buf: proto/ breaks the API as it was at $sha (FILE rules, see above)" >&2
    exit 1
  fi
done
