#!/usr/bin/env python3
"""Trains the built-in demo model and records its transformers references.

Run on a machine with an NVIDIA GPU, torch, transformers (>= 5) and tokenizers,
in one process (importing transformers is slow):

    python3 tools/train_default.py --corpus testdata/sotu --out OUT [--steps N]

Steps, all seeded (SEED below):
1. Split the State of the Union corpus as tools/sotu.py defines (train,
   validation, held-out); only the train part is trained on.
2. Train a byte-level BPE tokenizer (HF tokenizers) of VOCAB entries on the
   train part, with GLM-style special tokens (those of
   tools/tokenizer_make_glm.py) and a [gMASK]<sop> post-processor.
3. Train a Glm4MoeLiteForCausalLM from scratch (config in model_config()):
   AdamW, bf16 autocast, linear warmup then cosine decay, batches of BATCH
   random windows of SEQ tokens from the concatenated train addresses (each
   encoded as [gMASK]<sop> text <|endoftext|>), dropout DROPOUT on the
   embedding and on each block's attention and MLP outputs. The router bias is trained the
   aux-loss-free way (DeepSeek-V3): after each step it moves by BIAS_RATE
   towards balancing the expert loads. Without --steps, the step count is
   the smaller of MAX_EPOCHS epochs and what fits in --budget-s seconds at the
   throughput measured in a short calibration run (which is then discarded).
   The checkpoint with the best validation loss is kept.
4. Save it with save_pretrained (bf16; the router bias in fp32) plus the
   tokenizer files to OUT/sotu-bf16.
5. Reload it from disk in float32 (eager attention, no TF32) and record in
   OUT/sotu-ref: the greedy continuation of "Fellow citizens" with its logits,
   tokenizer cases, sample continuations, the unigram perplexity, and the
   sliding-window perplexity (windows as `mmfp4 ppl` makes them) of the
   held-out slice, the held-out evaluation text and the whole held-out split,
   plus simulated MMFP4-RTN-G128 and FP8 weights on the evaluation text.

GPU reductions are not bitwise deterministic, so a rerun with the same seed and
--steps gives close, not identical, weights.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sotu  # noqa: E402
from tokenizer_make_glm import ADDED, SPLIT_REGEX  # noqa: E402

SEED = 20261128
VOCAB = 8192  # tokenizer entries, special tokens included; also the model's vocab_size
SEQ = 512  # training window; also max_position_embeddings
BATCH = 32
PEAK_LR = 2e-3
MIN_LR_FRAC = 0.1
WARMUP = 100
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
BIAS_RATE = 1e-3
MAX_EPOCHS = 12
DROPOUT = 0.1
CAL_WARM, CAL_STEPS = 8, 20
VAL_WINDOWS = 64
GREEDY_PROMPT = "Fellow citizens"
GREEDY_TOKENS = 32
SAMPLE_PROMPTS = [
    "Fellow citizens",
    "Gentlemen of the Senate and House of Representatives:",
    "The state of the Union",
    "Our commerce with foreign nations",
    "Tonight, I want to talk about",
]
SAMPLE_TOKENS = 64
TOKENIZER_CASES = [
    ("Fellow-Citizens of the Senate and House of Representatives:", True),
    ("It’s 1,234,567 dollars — “quoted” text.\n\nNew paragraph;  two  spaces.", False),
    ("[gMASK]<sop><|user|>Hello<|assistant|><think></think>Yes.", False),
    ("<tool_call>get<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>", False),
]


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def model_config(vocab, eos_ids):
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        mlp_layer_types=["dense"] + ["sparse"] * 5,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.8,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        bos_token_id=None,
        pad_token_id=None,
        eos_token_id=eos_ids,
        tie_word_embeddings=False,
        attention_bias=False,
    )


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(ADDED), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    for content, special in ADDED:  # one at a time, so ids follow the list
        t = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    ids = {c: tok.token_to_id(c) for c, _ in ADDED}
    want = {c: base + i for i, (c, _) in enumerate(ADDED)}
    if ids != want:
        raise SystemExit(f"added token ids {ids}, want {want}")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B:1",
            special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])]),
    ])
    return tok, ids


def write_tokenizer_files(tok, ids, out, chat_template):
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": SEQ,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": eos_list(ids)}, f, indent=1)
        f.write("\n")
    shutil.copy(chat_template, os.path.join(out, "chat_template.jinja"))


def eos_list(ids):
    return [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]


# ---------------------------------------------------------------- windows


def window_plan(n, ctx, stride):
    """Sliding windows over n tokens, as `mmfp4 ppl` and the HF perplexity
    guide make them: windows start every stride tokens and end at most ctx
    later; each scores the tokens in [first, end) that no earlier window
    scored (a token needs one token of context before it in its window)."""
    wins, prev, begin = [], 0, 0
    while True:
        end = min(begin + ctx, n)
        wins.append((begin, end, max(prev, begin + 1)))
        prev = end
        if end == n:
            return wins
        begin += stride


def ids_digest(ids):
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="directory of the corpus .txt files (tools/fetch_sotu.sh)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chat-template", default=os.path.join(HERE, "..", "testdata", "tokenizer", "glm", "chat_template.jinja"))
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: calibrate against --budget-s)")
    ap.add_argument("--budget-s", type=float, default=270, help="training time to plan for when --steps is 0")
    ap.add_argument("--refs-only", action="store_true", help="skip training: record the references of OUT/sotu-bf16")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers
    import tokenizers
    from transformers import Glm4MoeLiteForCausalLM

    dev = torch.device("cuda")
    info = {"seed": SEED, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "gpu": torch.cuda.get_device_name(0)}
    log("versions", info)
    model_dir = os.path.join(args.out, "sotu-bf16")
    ref_dir = os.path.join(args.out, "sotu-ref")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(ref_dir, exist_ok=True)

    # 1. corpus
    parts = sotu.split(args.corpus)
    info["split"] = {k: [n for n, _ in v] for k, v in parts.items() if k != "train"}
    info["split"]["train_count"] = len(parts["train"])
    texts = {"heldout-slice.txt": sotu.slice_text(parts), "heldout-eval.txt": sotu.heldout_eval_text(parts),
             "heldout.txt": sotu.heldout_text(parts)}
    with open(os.path.join(ref_dir, "heldout-slice.txt"), "w", encoding="utf-8") as f:
        f.write(texts["heldout-slice.txt"])

    if args.refs_only:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        eot = tok.token_to_id("<|endoftext|>")
        train_ids = []
        for e in tok.encode_batch([x for _, x in parts["train"]]):
            train_ids.extend(e.ids + [eot])
        with open(os.path.join(ref_dir, "reference.json")) as f:
            info = json.load(f)
        references(args, info, model_dir, ref_dir, texts, torch.tensor(train_ids), dev)
        return

    # 2. tokenizer
    t = time.time()
    tok, sp = train_tokenizer([x for _, x in parts["train"]])
    info["tokenizer"] = {"vocab": tok.get_vocab_size(), "seconds": round(time.time() - t, 1), "added": sp}
    log("tokenizer", info["tokenizer"]["vocab"], "entries in", info["tokenizer"]["seconds"], "s")
    vocab = tok.get_vocab_size()
    eot = sp["<|endoftext|>"]

    def stream(docs):
        encs = tok.encode_batch([x for _, x in docs])
        out = []
        for e in encs:
            out.extend(e.ids)
            out.append(eot)
        return torch.tensor(out, dtype=torch.long)

    train_ids = stream(parts["train"])
    val_ids = stream(parts["val"])
    n_train = len(train_ids)
    info["train_tokens"] = n_train
    info["train_bytes"] = sum(len(x.encode()) for _, x in parts["train"])
    log(f"train {n_train} tokens ({info['train_bytes'] / n_train:.2f} bytes/token), val {len(val_ids)}")
    train_gpu = train_ids.to(dev)
    val_gpu = val_ids.to(dev)
    ar = torch.arange(SEQ + 1, device=dev)

    # 3. model
    cfg = model_config(vocab, eos_list(sp))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    experts_impl = ["grouped_mm"]  # falls back to "eager" if a training step fails with it

    def drop_hook(mod, inp, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], DROPOUT, mod.training),) + tuple(out[1:])
        return F.dropout(out, DROPOUT, mod.training)

    def build():
        torch.manual_seed(SEED)
        m = Glm4MoeLiteForCausalLM(cfg).to(dev)
        try:
            m.set_experts_implementation(experts_impl[0])
        except Exception as e:  # keep the default
            log("set_experts_implementation failed:", repr(e))
        # Training-only dropout on the embedding output and on each block's
        # attention and MLP outputs: the corpus is small and is seen many times.
        m.model.embed_tokens.register_forward_hook(drop_hook)
        for layer in m.model.layers:
            layer.self_attn.register_forward_hook(drop_hook)
            layer.mlp.register_forward_hook(drop_hook)
        return m

    def routers_of(m):
        return [(n, mod) for n, mod in m.named_modules()
                if "e_score_correction_bias" in dict(mod.named_buffers(recurse=False))]

    def make_opt(m):
        decay = [p for p in m.parameters() if p.ndim >= 2]
        rest = [p for p in m.parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                                 lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def batch(gen):
        starts = torch.randint(0, n_train - SEQ - 1, (BATCH,), generator=gen, device=dev)
        return train_gpu[starts[:, None] + ar[None, :]]

    def loss_of(m, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(input_ids=x[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    class Balancer:
        """Counts expert choices in training forward passes and moves each
        router's bias towards equal loads after every optimizer step."""

        def __init__(self, m):
            self.routers = routers_of(m)
            self.counts = {}
            self.last = {}
            self.ok = True
            for _, r in self.routers:
                r.register_forward_hook(self.hook)

        def hook(self, mod, inp, out):
            if not mod.training:
                return
            outs = out if isinstance(out, tuple) else (out,)
            n = mod.e_score_correction_bias.numel()
            idx = [o for o in outs if torch.is_tensor(o) and not o.is_floating_point()]
            if idx:
                idx = idx[-1]
            else:  # a router that returns only its logits: redo the choice (n_group is 1)
                lg = [o for o in outs if torch.is_tensor(o) and o.is_floating_point() and o.shape[-1] == n]
                if not lg:
                    self.ok = False
                    return
                sc = lg[0].detach().float().reshape(-1, n).sigmoid() + mod.e_score_correction_bias
                idx = sc.topk(cfg.num_experts_per_tok, dim=-1).indices
            c = torch.bincount(idx.reshape(-1), minlength=n).float()
            self.counts[id(mod)] = self.counts.get(id(mod), 0) + c

        @torch.no_grad()
        def update(self):
            for name, r in self.routers:
                c = self.counts.pop(id(r), None)
                if c is not None:
                    r.e_score_correction_bias.add_(BIAS_RATE * torch.sign(c.mean() - c))
                    self.last[name] = c

        def imbalance(self):
            """Max over mean expert load of the last step, per MoE layer."""
            return {n: round(float(c.max() / c.mean()), 3) for n, c in self.last.items()}

    def train_step(m, opt, bal, gen, sched_lr):
        x = batch(gen)
        for g in opt.param_groups:
            g["lr"] = sched_lr
        loss = loss_of(m, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), GRAD_CLIP)
        opt.step()
        bal.update()
        return loss, gn

    @torch.no_grad()
    def val_loss(m):
        m.eval()
        n = min(VAL_WINDOWS, (len(val_gpu) - 1) // SEQ)
        xs = torch.stack([val_gpu[i * SEQ: i * SEQ + SEQ + 1] for i in range(n)])
        tot = 0.0
        for i in range(0, n, BATCH):
            tot += float(loss_of(m, xs[i:i + BATCH])) * len(xs[i:i + BATCH])
        m.train()
        return tot / n

    steps_per_epoch = n_train / (BATCH * SEQ)
    # Calibration: a few steps on a throwaway model, to check the experts
    # implementation and to measure the throughput.
    gen = torch.Generator(device=dev).manual_seed(SEED + 1)
    m = build()
    m.train()
    opt = make_opt(m)
    bal = Balancer(m)
    try:
        train_step(m, opt, bal, gen, PEAK_LR * 0.1)
    except Exception as e:
        log(f"a training step with experts implementation {experts_impl[0]} failed ({e!r}); using eager")
        experts_impl[0] = "eager"
        m = build()
        m.train()
        opt = make_opt(m)
        bal = Balancer(m)
    for i in range(CAL_WARM + CAL_STEPS):
        if i == CAL_WARM:
            torch.cuda.synchronize()
            t = time.time()
        train_step(m, opt, bal, gen, PEAK_LR * 0.1)
    torch.cuda.synchronize()
    rate = CAL_STEPS / (time.time() - t)
    info["calibration_steps_per_s"] = round(rate, 2)
    info["experts_implementation"] = experts_impl[0]
    info["attn_implementation"] = str(getattr(m.config, "_attn_implementation", None))
    del m, opt, bal
    torch.cuda.empty_cache()
    steps = args.steps
    if steps <= 0:
        steps = min(int(rate * args.budget_s * 0.95), int(MAX_EPOCHS * steps_per_epoch))
    log(f"calibration: {rate:.2f} steps/s ({rate * BATCH * SEQ:.0f} tok/s), attention "
        f"{info['attn_implementation']}, experts {experts_impl[0]}; {steps} steps = {steps / steps_per_epoch:.2f} epochs")

    model = build()
    model.train()
    opt = make_opt(model)
    bal = Balancer(model)
    gen = torch.Generator(device=dev).manual_seed(SEED + 2)
    n_params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = sum(1 for t in cfg.mlp_layer_types if t == "sparse")
    active = n_params - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    info["config"] = cfg.to_dict()
    info["params"] = n_params
    info["active_params_per_token"] = active
    info["hyper"] = {"batch": BATCH, "seq": SEQ, "peak_lr": PEAK_LR, "min_lr_frac": MIN_LR_FRAC, "warmup": WARMUP,
                     "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "bias_rate": BIAS_RATE,
                     "betas": [0.9, 0.95], "max_epochs": MAX_EPOCHS, "dropout": DROPOUT}
    log(f"model: {n_params / 1e6:.2f} M parameters, {active / 1e6:.2f} M active per token")

    def lr_at(s):
        if s < WARMUP:
            return PEAK_LR * (s + 1) / WARMUP
        p = (s - WARMUP) / max(1, steps - WARMUP)
        return PEAK_LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))

    eval_every = max(50, steps // 20)
    best = (float("inf"), -1)
    best_state = None
    curve = []
    torch.cuda.synchronize()
    t_train = time.time()
    stopped_early = False
    for s in range(steps):
        loss, gn = train_step(model, opt, bal, gen, lr_at(s))
        if (s + 1) % eval_every == 0 or s + 1 == steps:
            vl = val_loss(model)
            el = time.time() - t_train
            curve.append({"step": s + 1, "train_loss": round(float(loss), 4), "val_loss": round(vl, 4),
                          "grad_norm": round(float(gn), 3), "seconds": round(el, 1)})
            log(f"step {s + 1}/{steps} loss {float(loss):.4f} val {vl:.4f} (ppl {math.exp(vl):.1f}) "
                f"lr {lr_at(s):.2e} gn {float(gn):.2f} {(s + 1) * BATCH * SEQ / el:.0f} tok/s")
            if vl < best[0]:
                best = (vl, s + 1)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if args.steps <= 0 and el > args.budget_s * 1.2:
                log("over the time budget: stopping")
                stopped_early = True
                break
    torch.cuda.synchronize()
    train_s = time.time() - t_train
    done = curve[-1]["step"] if curve else 0
    info["training"] = {"steps_planned": steps, "steps_done": done, "stopped_early": stopped_early,
                        "epochs": round(done / steps_per_epoch, 2), "tokens": done * BATCH * SEQ,
                        "seconds": round(train_s, 1), "tokens_per_s": round(done * BATCH * SEQ / train_s),
                        "best_step": best[1], "best_val_loss": round(best[0], 4),
                        "best_val_ppl": round(math.exp(best[0]), 2), "balancer_saw_indices": bal.ok,
                        "expert_load_max_over_mean": bal.imbalance(),
                        "max_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "curve": curve}
    log("training done", {k: v for k, v in info["training"].items() if k != "curve"})

    # 4. save
    model.load_state_dict(best_state)
    model.eval()
    biases = {n: best_state[n + ".e_score_correction_bias"].float().clone() for n, _ in routers_of(model)}
    model = model.to(torch.bfloat16)
    for n, r in routers_of(model):
        r.e_score_correction_bias = biases[n]  # keep the router bias in fp32, as GLM-4.7-Flash stores it
    model.save_pretrained(model_dir)
    write_tokenizer_files(tok, sp, model_dir, args.chat_template)
    log("saved", sorted(os.listdir(model_dir)))
    with open(os.path.join(ref_dir, "reference.json"), "w") as f:  # early copy, in case a later step fails
        json.dump(info, f, indent=1, default=str)
    del model, opt, best_state, train_gpu
    torch.cuda.empty_cache()

    # 5. references, in float32 from the saved files
    references(args, info, model_dir, ref_dir, texts, train_ids, dev)


def load_fp32(model_dir, dev):
    import torch
    from transformers import Glm4MoeLiteForCausalLM

    kw = dict(dtype=torch.float32, attn_implementation="eager")
    try:
        m = Glm4MoeLiteForCausalLM.from_pretrained(model_dir, experts_implementation="eager", **kw)
    except Exception as e:
        log("loading with experts_implementation=eager failed:", repr(e))
        m = Glm4MoeLiteForCausalLM.from_pretrained(model_dir, **kw)
    return m.to(dev).eval()


def run_stage(fn):
    """Runs one reference stage; a failure is logged and the others go on."""
    import traceback

    try:
        fn()
    except Exception:
        log(f"stage {fn.__name__} failed:\n" + traceback.format_exc())


def references(args, info, model_dir, ref_dir, texts, train_ids, dev):
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    import make_fixtures  # the MMFP4 RTN simulation (docs/format.md)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ref = load_fp32(model_dir, dev)
    vocab = ref.config.vocab_size
    out = {}

    # tokenizer cases
    info["tokenizer_cases"] = [{"text": s, "add_special": a, "ids": tok.encode(s, add_special_tokens=a).ids}
                               for s, a in TOKENIZER_CASES]

    @torch.no_grad()
    def greedy(prompt, n, stop=None):
        ids = torch.tensor([prompt], device=dev)
        o = ref(input_ids=ids, use_cache=True)
        past, nxt = o.past_key_values, o.logits[0, -1].argmax()
        gen = []
        for _ in range(n):
            if stop is not None and int(nxt) in stop:
                break
            gen.append(int(nxt))
            o = ref(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[0, -1].argmax()
        return gen

    def stage_greedy():
        prompt = tok.encode(GREEDY_PROMPT).ids
        g = greedy(prompt, GREEDY_TOKENS)
        full = torch.tensor([prompt + g], device=dev)
        with torch.no_grad():
            logits = ref(input_ids=full, use_cache=False).logits[0].float()
        steps = logits[len(prompt) - 1: len(prompt) - 1 + len(g)]
        top2 = steps.topk(2, dim=-1).values
        info["greedy"] = {"prompt": GREEDY_PROMPT, "prompt_ids": prompt, "ids": g,
                          "text": tok.decode(g, skip_special_tokens=False),
                          "full_pass_argmax_agrees": bool((steps.argmax(-1).tolist()) == g),
                          "min_top2_margin": round(float((top2[:, 0] - top2[:, 1]).min()), 4)}
        out.update({"prompt_ids": torch.tensor(prompt, dtype=torch.int64), "greedy_ids": torch.tensor(g, dtype=torch.int64),
                    "logits": logits.cpu().contiguous()})
        log("greedy:", repr(info["greedy"]["text"]), "margin", info["greedy"]["min_top2_margin"])

    def stage_samples():
        info["samples"] = []
        eos = set(ref.config.eos_token_id if isinstance(ref.config.eos_token_id, list) else [ref.config.eos_token_id])
        for p in SAMPLE_PROMPTS:
            s = greedy(tok.encode(p).ids, SAMPLE_TOKENS, stop=eos)
            info["samples"].append({"prompt": p, "continuation": tok.decode(s, skip_special_tokens=False)})
            log("sample:", repr(p), "->", repr(info["samples"][-1]["continuation"]))

    def stage_unigram():
        # unigram perplexity on the held-out split, from train counts (add-one)
        held = tok.encode(texts["heldout.txt"]).ids
        counts = torch.bincount(train_ids, minlength=vocab).double() + 1
        lp = torch.log(counts / counts.sum())
        info["unigram_ppl_heldout"] = round(math.exp(float(-lp[torch.tensor(held[1:])].mean())), 2)
        log("unigram ppl", info["unigram_ppl_heldout"])

    for fn in (stage_greedy, stage_samples, stage_unigram):
        run_stage(fn)

    # simulated quantized weights (CPU, then GPU)
    def simulated(fn):
        m = load_fp32(model_dir, torch.device("cpu"))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if make_fixtures.quantizable(name, p, 128):
                    p.copy_(fn(p.detach()))
        return m.to(dev).eval()

    def fp8_dequant(w):
        shape = w.shape
        w2 = w.float().reshape(-1, shape[-1])
        amax = w2.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 448.0))), torch.ones_like(amax))
        return ((w2 / scale).to(torch.float8_e4m3fn).float() * scale).reshape(shape)

    sims = {}
    try:
        sims["mmfp4_rtn_g128_float_act"] = simulated(lambda w: make_fixtures.rtn_dequant(w, 128))
        sims["fp8_e4m3_per_channel"] = simulated(fp8_dequant)
    except Exception as e:
        log("simulation failed:", repr(e))

    @torch.no_grad()
    def evaluate(models, ids, ctx, stride, batch=16):
        wins = window_plan(len(ids), ctx, stride)
        acc = [{"nll": 0.0, "tokens": 0, "kl": 0.0, "top1": 0} for _ in models]
        groups, cur = [], []
        for w in wins:
            if cur and (w[1] - w[0] != cur[0][1] - cur[0][0] or len(cur) == batch):
                groups.append(cur)
                cur = []
            cur.append(w)
        groups.append(cur)
        for grp in groups:
            x = torch.tensor([ids[b:e] for b, e, _ in grp], device=dev)
            tgt = x[:, 1:]
            pos = torch.arange(x.shape[1] - 1, device=dev)[None, :] + 1
            first = torch.tensor([f - b for b, _, f in grp], device=dev)[:, None]
            mask = pos >= first
            lps = [torch.log_softmax(m(input_ids=x, use_cache=False).logits.float(), -1)[:, :-1] for m in models]
            for k, lpk in enumerate(lps):
                tl = lpk.gather(-1, tgt[..., None])[..., 0]
                acc[k]["nll"] -= float(tl[mask].double().sum())
                acc[k]["tokens"] += int(mask.sum())
                if k > 0:
                    kl = (lps[0].exp() * (lps[0] - lpk)).sum(-1)
                    acc[k]["kl"] += float(kl[mask].double().sum())
                    acc[k]["top1"] += int((lps[0].argmax(-1) == lpk.argmax(-1))[mask].sum())
        res = []
        for k, a in enumerate(acc):
            r = {"ctx": ctx, "stride": stride, "windows": len(wins), "tokens": a["tokens"],
                 "mean_nll": a["nll"] / a["tokens"], "ppl": math.exp(a["nll"] / a["tokens"])}
            if k > 0:
                r["kl"] = a["kl"] / a["tokens"]
                r["top1"] = a["top1"] / a["tokens"]
            res.append(r)
        return res

    def stage_ppl():
        info["ppl"] = {}
        jobs = [("heldout-slice.txt", 256, 128, False), ("heldout-slice.txt", 512, 256, False),
                ("heldout-eval.txt", 512, 256, True), ("heldout-eval.txt", 512, 512, False),
                ("heldout.txt", 512, 256, False)]
        for name, ctx, stride, with_sims in jobs:
            ids = tok.encode(texts[name]).ids
            models = [ref] + (list(sims.values()) if with_sims else [])
            t = time.time()
            res = evaluate(models, ids, ctx, stride)
            entry = {"file_tokens": len(ids), "ids_sha256": ids_digest(ids), "bf16": res[0]}
            for (k, _), r in zip(sims.items() if with_sims else [], res[1:]):
                entry[k] = r
            if name == "heldout-slice.txt" and ctx == 256:
                entry["ids"] = ids
            info["ppl"][f"{name}@{ctx}/{stride}"] = entry
            log(f"ppl {name} ctx {ctx} stride {stride}: {len(ids)} tokens, " +
                ", ".join(f"{k} {v['ppl']:.3f}" for k, v in entry.items() if isinstance(v, dict)),
                f"({time.time() - t:.1f}s)")

    run_stage(stage_ppl)
    if out:
        save_file(out, os.path.join(ref_dir, "reference.safetensors"))
    info["total_seconds"] = round(time.time() - T0, 1)
    with open(os.path.join(ref_dir, "reference.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    log("wrote", ref_dir)


if __name__ == "__main__":
    main()
