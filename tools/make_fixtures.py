#!/usr/bin/env python3
"""Create the tiny random glm4_moe_lite fixture and its HF transformers reference.

Run on a machine with torch and transformers (>= 5):

    python3 tools/make_fixtures.py OUTDIR

OUTDIR/glm4moelite-tiny/ receives the model exactly as save_pretrained writes it
(bf16) and OUTDIR/glm4moelite-tiny-ref/ the reference data:

- reference.safetensors: prompt_ids, greedy_ids (16 greedy tokens with the KV
  cache), logits (float32 logits of the bf16 weights run in float32 for every
  position of prompt + continuation), rtn_logits (the same with every weight
  matrix replaced by its plain round-to-nearest MMFP4 group-128 reconstruction).
- rtn_g{32,64,128}.safetensors: the RTN reconstruction of a few tensors, for the
  Go codec tests.
- reference.json: the mean KL(ref || rtn) and top-1 agreement of the RTN model,
  on the prompt + continuation and on EVAL_SEQS extra random sequences
  (eval_ids, eval_logits, eval_rtn_logits in reference.safetensors).
- hidden.safetensors: the residual stream of the float32 reference on prompt +
  continuation (ids): the embedding (embed), the state after each layer's
  attention (layers.L.attn_residual) and after the whole layer
  (layers.L.output, what output_hidden_states reports), the final norm's
  output (norm) and the logits, each positions x hidden (or vocab), so tests
  can name the first layer that is off.

The GLM-style test tokenizer of testdata/tokenizer/glm is copied in.
The RTN rule simulated here is the one in docs/format.md.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

PROMPT_LEN = 12
GEN = 16
EVAL_SEQS, EVAL_LEN = 8, 32  # extra sequences so KL is averaged over many positions
SEED = 1234


def tiny_config():
    return Glm4MoeLiteConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=1.8,
        kv_lora_rank=128,
        q_lora_rank=128,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        bos_token_id=0,
        eos_token_id=[464, 471, 473],  # the GLM test tokenizer's <|endoftext|>, <|user|>, <|observation|>
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def randomize(model, gen):
    """Non-trivial weights: unit-scale matrices, norms far from 1, nonzero bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=gen))
            else:
                fan_in = p.shape[-1]
                std = 1.0 if "embed_tokens" in name else fan_in ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


# ---- MMFP4 round-to-nearest, exactly as docs/format.md specifies ----

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_round(x):
    """Nearest E2M1 value, ties to the even code, saturating at 6."""
    a = x.abs()
    mids = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
    code = torch.zeros_like(a, dtype=torch.int64)
    for i, m in enumerate(mids.tolist()):
        up = (a > m) | ((a == m) & ((i + 1) % 2 == 0))
        code += up.to(torch.int64)
    return torch.where(x < 0, -E2M1_VALUES[code], E2M1_VALUES[code])


def e4m3(x):
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def rtn_dequant(w, group):
    w = w.to(torch.float32)
    shape = w.shape
    w = w.reshape(-1, shape[-1])
    n, k = w.shape
    amax_row = w.abs().amax(dim=1, keepdim=True)
    row_scale = torch.where(amax_row == 0, torch.ones_like(amax_row), amax_row / 2688.0)
    wg = w.reshape(n, k // group, group)
    amax_g = wg.abs().amax(dim=2, keepdim=True)
    t = (row_scale * 6.0).unsqueeze(2)
    s = e4m3(amax_g / t)
    d = row_scale.unsqueeze(2) * s
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = e2m1_round(wg / safe)
    out = torch.where(d == 0, torch.zeros_like(wg), d * q)
    return out.reshape(shape)


def record_hidden(model, ids):
    """Run ids through model once and keep the residual stream, read with
    forward hooks (so nothing depends on how a transformers version packs
    output_hidden_states, which is only cross-checked here)."""
    states = {}

    def keep(name, t):
        states[name] = t[0].detach().to(torch.float32).contiguous().clone()  # drop the batch axis

    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(lambda mod, args, out: keep("embed", out))]
    for i, layer in enumerate(inner.layers):
        # The post-attention norm's input is the residual stream after attention.
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, i=i: keep(f"layers.{i}.attn_residual", args[0])))
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: keep(f"layers.{i}.output", out[0] if isinstance(out, tuple) else out)))
    hooks.append(inner.norm.register_forward_hook(lambda mod, args, out: keep("norm", out)))
    try:
        with torch.no_grad():
            o = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    states["logits"] = o.logits[0].to(torch.float32).contiguous().clone()
    for k, h in enumerate(o.hidden_states or ()):
        same = [n for n, v in states.items() if v.shape == h[0].shape and torch.equal(v, h[0].to(torch.float32))]
        print(f"output_hidden_states[{k}] equals {same or 'no hooked state'}")
    states["ids"] = ids[0].to(torch.int64).contiguous()
    return states


def quantizable(name, p, group):
    return p.ndim >= 2 and not name.endswith("mlp.gate.weight") and p.shape[-1] % group == 0


def main():
    out = sys.argv[1]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cfg = tiny_config()
    model = Glm4MoeLiteForCausalLM(cfg)
    randomize(model, gen)
    model = model.to(torch.bfloat16)
    model_dir = os.path.join(out, "glm4moelite-tiny")
    model.save_pretrained(model_dir)
    # A small GLM-style byte-level BPE tokenizer (testdata/tokenizer/glm, ids
    # below 512) rides along, so the fixture also takes text and chat prompts.
    tok_src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "tokenizer", "glm")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(tok_src, f), os.path.join(model_dir, f))

    # The reference runs the bf16 weights in float32 (eager attention).
    ref = Glm4MoeLiteForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    prompt = torch.randint(2, cfg.vocab_size, (1, PROMPT_LEN), generator=gen)

    with torch.no_grad():
        ids = prompt
        o = ref(input_ids=ids, use_cache=True)
        past, nxt = o.past_key_values, o.logits[0, -1].argmax()
        greedy = []
        for _ in range(GEN):
            greedy.append(int(nxt))
            o = ref(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[0, -1].argmax()
        full = torch.cat([prompt, torch.tensor([greedy])], dim=1)
        logits = ref(input_ids=full, use_cache=False).logits[0].float()
        hidden = record_hidden(ref, full)
        print("hooked run's logits vs the plain run's: max |diff|", float((hidden["logits"] - logits).abs().max()))

        rtn = Glm4MoeLiteForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
        sd = rtn.state_dict()
        for name, p in rtn.named_parameters():
            if quantizable(name, p, 128):
                p.copy_(rtn_dequant(p, 128))
        rtn_logits = rtn(input_ids=full, use_cache=False).logits[0].float()

        eval_ids = torch.randint(2, cfg.vocab_size, (EVAL_SEQS, EVAL_LEN), generator=gen)
        eval_logits = ref(input_ids=eval_ids, use_cache=False).logits.float()
        eval_rtn_logits = rtn(input_ids=eval_ids, use_cache=False).logits.float()

    lp = torch.log_softmax(logits, -1)
    lq = torch.log_softmax(rtn_logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    top1 = (logits.argmax(-1) == rtn_logits.argmax(-1)).float().mean()
    ep = torch.log_softmax(eval_logits, -1)
    eq = torch.log_softmax(eval_rtn_logits, -1)
    eval_kl = (ep.exp() * (ep - eq)).sum(-1)
    eval_top1 = (eval_logits.argmax(-1) == eval_rtn_logits.argmax(-1)).float().mean()

    ref_dir = os.path.join(out, "glm4moelite-tiny-ref")
    os.makedirs(ref_dir, exist_ok=True)
    save_file(
        {
            "prompt_ids": prompt[0].to(torch.int64).contiguous(),
            "greedy_ids": torch.tensor(greedy, dtype=torch.int64),
            "logits": logits.contiguous(),
            "rtn_logits": rtn_logits.contiguous(),
            "eval_ids": eval_ids.to(torch.int64).contiguous(),
            "eval_logits": eval_logits.contiguous(),
            "eval_rtn_logits": eval_rtn_logits.contiguous(),
        },
        os.path.join(ref_dir, "reference.safetensors"),
    )
    save_file(hidden, os.path.join(ref_dir, "hidden.safetensors"))

    # Saved tensors, read back from disk: the codec tests quantize these.
    from safetensors.torch import load_file
    saved = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            saved.update(load_file(os.path.join(model_dir, f)))
    pick = [n for n in saved if n.endswith("kv_b_proj.weight")][:1]
    pick += [n for n in saved if "experts" in n and "down_proj" in n][:1]
    pick += ["model.embed_tokens.weight"]
    for g in (32, 64, 128):
        save_file({n: rtn_dequant(saved[n], g).contiguous() for n in pick}, os.path.join(ref_dir, f"rtn_g{g}.safetensors"))

    info = {
        "kl_rtn_g128_mean": float(kl.mean()),
        "top1_rtn_g128": float(top1),
        "eval_kl_rtn_g128_mean": float(eval_kl.mean()),
        "eval_top1_rtn_g128": float(eval_top1),
        "prompt_len": PROMPT_LEN,
        "generated": GEN,
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
        "saved_tensors": sorted(saved.keys()),
        "rtn_checked_tensors": pick,
    }
    with open(os.path.join(ref_dir, "reference.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k != "saved_tensors"}, indent=1))
    print("saved tensor names (first 40):", sorted(saved.keys())[:40])
    print("greedy:", greedy)


if __name__ == "__main__":
    main()
