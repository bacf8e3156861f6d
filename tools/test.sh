#!/usr/bin/env bash
# Runs every check: formatting, go vet, and all tests with the race detector.
# Fetches the tokenizer test files first (cached in testdata/tokenizers/).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/fetch_tokenizers.sh

unformatted=$(gofmt -l .)
if [[ -n $unformatted ]]; then
	echo "gofmt would change:" >&2
	echo "$unformatted" >&2
	exit 1
fi
go vet ./...
go test -race -timeout 30m ./...
