"""Micro-benchmark: padded two rows vs the shared-prompt layout (fwd+bwd of the policy log-probs).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_sharing.py [--iters 7] [--warmup 2]

A ~20M-parameter random-init Llama (hidden 384, 6 layers, 6 heads / 2 KV heads, vocab 32000, tied
embeddings), fp32 on CPU, 2 pairs per batch, synthetic prompt-heavy (P~400, R~60) and response-heavy
(P~100, R~250) pairs. Variants run round-robin within each iteration (this machine drifts between a slow
and a fast state over minutes), so the ratios compare neighbouring runs. Prints a markdown table per data
set: median/min/max ms per fwd+bwd step, ratio of medians vs padded, tokens through the model and the
padding share. Never run in tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import statistics
import time

import torch

from preftune.model import PaddedLogps, SharedPromptLogps, collate_padded, collate_shared
from preftune.model.attention import prepare_shared

PAD = 0


def make_pairs(n, prompt, response, vocab, seed):
    g = torch.Generator().manual_seed(seed)

    def length(mean):
        return int(mean * (0.8 + 0.4 * torch.rand((), generator=g).item()))

    def toks(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [
        {
            "prompt_ids": toks(length(prompt)),
            "chosen_ids": toks(length(response)),
            "rejected_ids": toks(length(response)),
            "weight": 1.0,
            "index": i,
        }
        for i in range(n)
    ]


def build_model(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def matmul_gflops(n=1024, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def variants(model, pairs):
    """name -> (module, inputs, tokens through the model, padded slots)."""
    out = {}
    padded = collate_padded(pairs, PAD)
    out["padded two rows"] = (
        PaddedLogps(copy.deepcopy(model), chunk_size=1024),
        padded.model_inputs(),
        int(padded.attention_mask.sum()),
        padded.input_ids.numel(),
    )
    layers = model.config.num_hidden_layers
    for name, kw in [("shared, one row", {}), ("shared, row per pair", {"pairs_per_row": 1})]:
        batch = collate_shared(pairs, PAD, **kw)
        shared_model = copy.deepcopy(model)
        prepare_shared(shared_model)
        module = SharedPromptLogps(shared_model, chunk_size=1024, attention_layers=layers)
        real = int(batch.segments[:, 2:].sum())
        out[name] = (module, batch.model_inputs(), real, batch.input_ids.numel())
    return out


def attention_only(name, pairs, iters, heads=6, kv_heads=2, head_dim=64):
    """One attention layer fwd+bwd on each layout: the per-segment calls against one masked SDPA call."""
    from preftune.model.attention import SegmentPlan, _planned_attention

    cases = {}
    padded = collate_padded(pairs, PAD)
    mask = padded.attention_mask.bool()
    rows, length = mask.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    pad_mask = (causal[None] & mask[:, None, :]) | torch.eye(length, dtype=torch.bool)
    cases["padded two rows (HF SDPA padding mask)"] = (None, rows, length, pad_mask[:, None])
    for label, kw in [("shared, one row", {}), ("shared, row per pair", {"pairs_per_row": 1})]:
        b = collate_shared(pairs, PAD, **kw)
        r, t = b.input_ids.shape
        cases[label] = (b.segments.tolist(), r, t, None)

    def run_case(case):
        segs, r, t, extra = case
        q = torch.randn(r, heads, t, head_dim, requires_grad=True)
        k = torch.randn(r, kv_heads, t, head_dim, requires_grad=True)
        v = torch.randn(r, kv_heads, t, head_dim, requires_grad=True)
        start = time.perf_counter()
        if segs is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=extra, enable_gqa=True
            )
        else:
            out = _planned_attention(
                SegmentPlan(segs, r, t), q, k, v,
                dropout=0.0, scaling=None, window=None, softcap=None, sinks=None,
            )  # fmt: skip
        out.sum().backward()
        return (time.perf_counter() - start) * 1e3

    times = {label: [] for label in cases}
    for i in range(iters + 2):
        for label, case in cases.items():
            ms = run_case(case)
            if i >= 2:
                times[label].append(ms)
    base = statistics.median(times[next(iter(cases))])
    print(
        f"\n#### {name}: one attention layer alone (6 heads / 2 KV heads, head dim 64), fwd+bwd\n"
    )
    print("| layout, attention | median ms | min | max | speed-up vs padded |")
    print("|---|---:|---:|---:|---:|")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"| {label} | {med:.1f} | {min(ts):.1f} | {max(ts):.1f} | {base / med:.2f}x |")


def step(module, inputs):
    module.zero_grad(set_to_none=True)
    logps = module(**inputs)[0]
    logps.sum().backward()
    return logps.detach()


def run(name, pairs, model, iters, warmup):
    vs = variants(model, pairs)
    ref = None
    for label, (module, inputs, _, _) in vs.items():  # exactness check on these inputs
        logps = step(module, inputs)
        if ref is None:
            ref = logps
        err = (logps - ref).abs().max().item()
        if err > 1e-3:
            raise SystemExit(f"{label}: log-probs differ from padded by {err:.2e}")
    for _ in range(warmup - 1):
        for module, inputs, _, _ in vs.values():
            step(module, inputs)
    times = {label: [] for label in vs}
    for _ in range(iters):
        for label, (module, inputs, _, _) in vs.items():
            t = time.perf_counter()
            step(module, inputs)
            times[label].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times[next(iter(vs))])
    p = [len(x["prompt_ids"]) for x in pairs]
    r = [len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in pairs]
    print(f"\n### {name}: {len(pairs)} pairs, prompt lengths {p}, chosen+rejected lengths {r}\n")
    print(
        "| variant | median ms | min | max | speed-up vs padded | tokens in model | padding share |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (_, _, real, slots) in vs.items():
        ts = times[label]
        med = statistics.median(ts)
        print(
            f"| {label} | {med:.0f} | {min(ts):.0f} | {max(ts):.0f} | {base / med:.2f}x "
            f"| {real} | {1 - real / slots:.0%} |"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn-iters", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, model {n_params / 1e6:.1f}M params "
        f"(hidden 384, 6 layers, 6/2 heads, vocab {args.vocab}), fp32, fwd+bwd of sum(logps), "
        f"{args.iters} timed iterations after {args.warmup} warm-up, variants round-robin"
    )
    print(f"fp32 matmul before: {matmul_gflops():.0f} GFLOP/s")
    data = [
        ("prompt-heavy (P~400, R~60)", make_pairs(args.pairs, 400, 60, args.vocab, seed=1)),
        ("response-heavy (P~100, R~250)", make_pairs(args.pairs, 100, 250, args.vocab, seed=2)),
    ]
    for name, pairs in data:
        run(name, pairs, model, args.iters, args.warmup)
        attention_only(name, pairs, args.attn_iters)
    print(f"\nfp32 matmul after: {matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
