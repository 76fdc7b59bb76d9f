#!/bin/bash
# Prints a directory that makes this checkout importable as the `pdrun` package without installing
# it (a host where pip cannot install it, its other wheels installed with pip --target): put it on
# PYTHONPATH. It holds links to the checkout's folders, so edits there take effect at once.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${TMPDIR:-/tmp}/pdrun-source-$(id -u)
mkdir -p "$DIR/pdrun"
for package in pd transfer storage launch; do ln -sfn "$ROOT/$package" "$DIR/pdrun/$package"; done
echo "$DIR"
