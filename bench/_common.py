"""Shared pieces of the preftune-vs-TRL benchmark: model shapes, synthetic data, a word-level tokenizer,
token counting from the data, the fp32 matmul probe and RSS readings.

Nothing here imports torch at module level: the orchestrating parent process stays small, and every model is
built and trained in a child process (see ``compare.py``).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Model shapes (LlamaConfig kwargs). All random-init, fp32, saved as safetensors.

MODELS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: checks the harness end to end in seconds.
    "tiny": dict(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # ~21M parameters, most of them in the two 32k-vocab matrices (untied): LM-head dominated, as in the
    # profile of issue 7.
    "20m": dict(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    # SmolLM-135M's shape.
    "smol135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
}
COMMON_MODEL_KWARGS = dict(
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    initializer_range=0.02,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_bias=False,
    mlp_bias=False,
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3; every other id is a word "w<id>"

# ---------------------------------------------------------------------------------------------------
# Synthetic preference data. Lengths are in TOKENS at max_length 512 and scale linearly with max_length / 512
# (so the max_length-1024 rows really use ~1024-token rows). Every row fits max_length, so neither system
# truncates: both train on exactly the same tokens.


@dataclass(frozen=True)
class DataSpec:
    prompt: tuple[
        str, float, float
    ]  # ("normal", mean, sd) or ("uniform", low, high), in tokens incl. BOS
    response: tuple[str, float, float]  # per response, in tokens incl. EOS


DATASETS: dict[str, DataSpec] = {
    "prompt-heavy": DataSpec(("normal", 400, 25), ("normal", 60, 12)),
    "response-heavy": DataSpec(("normal", 100, 15), ("normal", 250, 30)),
    "mixed": DataSpec(("uniform", 16, 400), ("uniform", 8, 240)),
}


def _draw(rng: random.Random, dist: tuple[str, float, float], scale: float) -> int:
    kind, a, b = dist
    x = rng.gauss(a, b) if kind == "normal" else rng.uniform(a, b)
    return max(2, round(x * scale))


def make_pairs(
    dataset: str, n_pairs: int, *, max_length: int, vocab_size: int, seed: int
) -> list[dict]:
    """``n_pairs`` string records {prompt, chosen, rejected} of random words ``w<id>``.

    With the word-level tokenizer of :func:`make_tokenizer` a prompt of k words is k+1 tokens (BOS) and a
    response of k words is k+1 tokens (EOS). Responses start with a space so that ``prompt + response``
    splits at the boundary for both systems.
    """
    spec = DATASETS[dataset]
    scale = max_length / 512
    rng = random.Random(f"{dataset}|{n_pairs}|{max_length}|{seed}")
    first_word, last_word = len(SPECIALS), vocab_size - 1

    def words(n: int) -> str:
        return " ".join(f"w{rng.randint(first_word, last_word)}" for _ in range(n))

    rows = []
    for _ in range(n_pairs):
        p = min(_draw(rng, spec.prompt, scale), max_length - 8)
        budget = max_length - p  # tokens left for one response (EOS included)
        c = min(_draw(rng, spec.response, scale), budget)
        r = min(_draw(rng, spec.response, scale), budget)
        chosen, rejected = words(c - 1), words(r - 1)
        while rejected == chosen:
            rejected = words(r - 1)
        rows.append({"prompt": words(p - 1), "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def pair_token_counts(row: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts of a record, from the data: BOS + words, words + EOS."""
    return (
        1 + len(row["prompt"].split()),
        len(row["chosen"].split()) + 1,
        len(row["rejected"].split()) + 1,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


# ---------------------------------------------------------------------------------------------------
# Building the model folder (run in a child process: imports torch/transformers).


def make_tokenizer(out_dir: Path, vocab_size: int):
    """A WordLevel fast tokenizer over ``<pad> <s> </s> <unk> w4 .. w{V-1}`` splitting on whitespace, with a
    BOS post-processor; token counts are exactly controllable. Saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1_000_000,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_model_folder(out_dir: Path, model_name: str, *, seed: int) -> dict:
    """Random-init Llama of shape ``model_name`` (+ tokenizer) saved to ``out_dir``; returns its metadata."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    kwargs = {**COMMON_MODEL_KWARGS, **MODELS[model_name]}
    config = LlamaConfig(**kwargs)
    config.use_cache = False
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(out_dir, kwargs["vocab_size"])
    total = sum(p.numel() for p in model.parameters())  # shared (tied) weights counted once
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    # Parameters that take part in a matmul per token: everything but the embedding lookup, plus the LM head
    # (which IS the embedding matrix when tied).
    matmul_params = total - embed + (head if kwargs["tie_word_embeddings"] else 0)
    meta = {
        "name": model_name,
        "seed": seed,
        "params_total": total,
        "params_matmul": matmul_params,
        "config": {k: v for k, v in kwargs.items()},
    }
    (out_dir / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    return meta


# ---------------------------------------------------------------------------------------------------
# Machine-state probes (child side).


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Median-of-``reps`` fp32 ``n``³ matmul rate in GFLOP/s (2n³ FLOPs per product), after one warm-up."""
    import statistics

    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def vm_kib(field: str = "VmHWM") -> int | None:
    """``VmHWM`` (peak RSS since exec) or ``VmRSS`` of this process from /proc, in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kib() -> int:
    """Peak RSS of this process in KiB: VmHWM, else getrusage (which may include a parent's RSS at fork)."""
    hwm = vm_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def bench_env() -> dict[str, str]:
    """Environment for every child: PASSIVE OpenMP waits, offline hubs, quiet progress bars."""
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TQDM_DISABLE"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env
