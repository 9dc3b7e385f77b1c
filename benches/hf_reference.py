#!/usr/bin/env python3
"""Reference values and throughput from Hugging Face transformers (PyTorch, CPU) on the same GGUF
files curec loads (transformers dequantizes GGUF to float32, as curec does).

  python benches/hf_reference.py reference <gguf> > ref.json     # token ids, logits, greedy ids
  python benches/hf_reference.py generate <gguf> --batch 8 --new-tokens 64 --prompt-tokens 32
  python benches/hf_reference.py logprobs <gguf> --batch 8 --seq-len 256

Needs: pip install torch transformers gguf numpy (see README, "Comparing with transformers").
"""
import argparse, json, os, sys, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello world",
    "The user watched Toy Story (1995) and Heat (1995).",
    "  leading spaces, tabs\tand\nnew lines\n\n  ",
    "Numbers 1234567 and 3.14159; émigré café naïve — “quotes”",
    "<|im_start|>user\nRecommend a movie.<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square",
    "日本語のテキストと中文文本",
]
BENCH_TEXT = ("The user watched Toy Story (1995), Jumanji (1995), Heat (1995) and GoldenEye (1995). "
              "Describe what kind of films this user enjoys and suggest what to watch next. ")


def load(path):
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    return tok, model


def prompt_ids(tok, n):
    ids = []
    while len(ids) < n:
        ids += tok.encode(BENCH_TEXT, add_special_tokens=False)
    return ids[:max(n, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["reference", "generate", "logprobs"])
    ap.add_argument("gguf")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok, model = load(a.gguf)
    if a.what == "reference":
        out = {"texts": TEXTS, "ids": [tok.encode(t, add_special_tokens=False) for t in TEXTS]}
        prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ids = tok.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            g = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        last = logits[-1]
        top = torch.topk(last, 5)
        out.update({
            "prompt": prompt, "prompt_ids": ids,
            "top5_ids": top.indices.tolist(), "top5_logits": top.values.tolist(),
            "logits_first_pos_first8": logits[0, :8].tolist(),
            "logit_mean_last": float(last.mean()), "logit_std_last": float(last.std()),
            "greedy_ids": g[0, len(ids):].tolist(),
        })
        print(json.dumps(out))
        return
    ids = prompt_ids(tok, a.prompt_tokens if a.what == "generate" else a.seq_len)
    if a.what == "generate":
        x = torch.tensor([ids] * a.batch)
        with torch.no_grad():
            model.generate(x[:1], max_new_tokens=2, do_sample=True, min_new_tokens=2)
            t0 = time.time()
            g = model.generate(x, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=True,
                               temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.eos_token_id)
            secs = time.time() - t0
        n = (g.shape[1] - x.shape[1]) * a.batch
        print(json.dumps({"bench": "generate", "impl": "transformers", "torch": torch.__version__, "threads": a.threads,
                          "batch": a.batch, "new_tokens": a.new_tokens, "prompt_tokens": a.prompt_tokens,
                          "generated_tokens": n, "seconds": secs, "tokens_per_s": n / secs}))
    else:
        x = torch.tensor([ids] * a.batch)
        half = a.seq_len // 2
        with torch.no_grad():
            t0 = time.time()
            logits = model(x).logits[:, half - 1:-1]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, x[:, half:, None])
            secs = time.time() - t0
        print(json.dumps({"bench": "logprobs", "impl": "transformers", "batch": a.batch, "seq_len": a.seq_len,
                          "forward_seconds": secs, "tokens_per_s": a.batch * a.seq_len / secs,
                          "mean_log_prob": float(lp.mean())}))


if __name__ == "__main__":
    main()
