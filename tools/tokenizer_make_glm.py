#!/usr/bin/env python3
"""Writes the small GLM-style tokenizer used by the tokenizer tests.

Output: testdata/tokenizer/glm/{tokenizer.json, tokenizer_config.json,
generation_config.json}. The chat template beside them,
chat_template.jinja, is written by hand.

The model is a byte-level BPE trained here on a few sentences (standard
library only), so that the file is small yet has real merges. Its special
tokens follow GLM-4: [gMASK]<sop> starts a prompt, role tokens open turns,
and <think>/<tool_call> style markers are added (non-special) tokens.
Run: python3 tools/tokenizer_make_glm.py
"""
import collections
import json
import os
import re

OUT = os.path.join(os.path.dirname(__file__), "..", "testdata", "tokenizer", "glm")
N_MERGES = 400

CORPUS = """
You are a helpful assistant. The user asks questions and the assistant answers them.
What is the weather like in Paris today? It is sunny, with a temperature of 22 degrees.
The quick brown fox jumps over the lazy dog. Then the dog sleeps in the sun.
Let me think about this step by step: first, add the numbers; then, check the result.
def function(name, arguments): return the result of calling the tool with arguments
Hello, world! How are you? I am fine, thank you. Thanks for asking, and you?
""" * 3

SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special): special tokens are skipped by decode(skip_special_tokens).
ADDED = [
    ("<|endoftext|>", True),
    ("[MASK]", True),
    ("[gMASK]", True),
    ("[sMASK]", True),
    ("<sop>", True),
    ("<eop>", True),
    ("<|system|>", True),
    ("<|user|>", True),
    ("<|assistant|>", True),
    ("<|observation|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<arg_key>", False),
    ("</arg_key>", False),
    ("<arg_value>", False),
    ("</arg_value>", False),
]


def byte_to_unicode():
    """The GPT-2 byte-level alphabet: printable bytes stand for themselves,
    the others are shifted past U+0100 so that every byte is visible."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def train(words, n_merges):
    """Plain BPE training: repeatedly merge the most frequent adjacent pair
    (ties broken by the pair itself so that the output is reproducible)."""
    seqs = collections.Counter(tuple(w) for w in words)
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for seq, n in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = collections.Counter()
        for seq, n in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] += n
        seqs = merged
    return merges


def main():
    b2u = byte_to_unicode()
    # Training only needs rough words; the runtime split uses SPLIT_REGEX.
    words = ["".join(b2u[b] for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\s\w]+|\s+", CORPUS)]
    merges = train(words, N_MERGES)

    vocab = {b2u[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = []
    for content, special in ADDED:
        added.append({
            "id": len(vocab) + len(added), "content": content, "single_word": False,
            "lstrip": False, "rstrip": False, "normalized": False, "special": special,
        })
    ids = {a["content"]: a["id"] for a in added}

    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
                        {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
                      {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {
                 "[gMASK]": {"id": "[gMASK]", "ids": [ids["[gMASK]"]], "tokens": ["[gMASK]"]},
                 "<sop>": {"id": "<sop>", "ids": [ids["<sop>"]], "tokens": ["<sop>"]},
             }},
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": [a + " " + b for a, b in merges],
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128000,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    generation = {"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]}

    os.makedirs(OUT, exist_ok=True)
    for name, obj in [("tokenizer.json", tok), ("tokenizer_config.json", config),
                      ("generation_config.json", generation)]:
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print("vocab", len(vocab), "merges", len(merges), "added", len(added))


if __name__ == "__main__":
    main()
