"""A golden run: the first 10 optimizer steps of a tiny seeded run pinned (loss, rewards chosen / rejected /
margins, grad norm), so that a refactor cannot silently change the maths.

The run: tests/_tiny.py's tiny Llama (``make_tiny_llama(seed=0)``: 2 layers, hidden 32, tied, char
tokenizer), ``toy_pairs(64, seed=0)``, and ``tiny_train_config`` (max_length 64, max_prompt_length 32, AdamW
lr 3e-3 without warm-up, linear schedule, clipping at 1.0, seed 0, reference auto = a frozen copy, prefix
sharing auto = on for Llama, CPU, fp32) with ``loss.name=[sigmoid, sft]``, ``loss.weights=[1.0, 0.5]``,
``loss.beta=0.1``, ``train.batch_size=4``, ``train.grad_accum=2`` (so the exact-accumulation divisors and
the weighted combination of a pair term and a token term are both pinned), 10 steps (64 pairs = 8 steps
per epoch: the second epoch's reshuffle is pinned too), ``log.log_every=1``.

Derivation: the values were computed once at commit 88049464576dec251768563660b14eb6dc6fbcd5 (``git rev-parse
HEAD`` before the issue-16 refactor), on a 2-core x86-64 CPU with torch 2.13.0, by

    mkdir /tmp/head && git archive HEAD | tar -x -C /tmp/head &&
    cp tests/test_golden.py /tmp/head/tests/ && cd /tmp/head &&
    OMP_WAIT_POLICY=PASSIVE PREFTUNE_CACHE=$(mktemp -d) PYTHONPATH=src python tests/test_golden.py

which prints ``GOLDEN`` (``python tests/test_golden.py`` in any checkout prints that checkout's values). The
refactored tree gave the same numbers bitwise, with 1 and with 2 threads.

Tolerance: 1e-6 relative (1e-9 absolute for the step-1 rewards, exactly 0 at the reference). Not bitwise
across machines: fp32 sums (matmuls, log-softmax, the gradient norm) are reduced in an order that depends on
the thread count and the SIMD width that the kernels split the work by, so another CPU may differ in the last
bits (~1e-7 relative), amplified a little over 10 AdamW steps. A change to the maths moves these numbers by
far more. Tried once (then reverted): the common sketch's divisor, each micro-batch's loss divided by its own
pair and token counts times the number of micro-batches (a mean of micro-batch means) instead of the
window's totals, leaves the pair term alone here (equal micro-batches) but moves the sft term: the step-1
loss by 1.5e-5 relative, later losses by up to 1e-3 — all ten fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm")
STEPS = 10
REL, ABS = 1e-6, 1e-9

GOLDEN: dict[str, list[float]] = {
    "loss": [
        2.656075596809387,
        2.538989305496216,
        2.4657654762268066,
        2.4178872108459473,
        2.3728585243225098,
        2.327047348022461,
        2.3000024557113647,
        2.2554742097854614,
        2.2347025275230408,
        2.1906490325927734,
    ],
    "rewards/chosen": [
        0.0,
        0.14061718434095383,
        0.24076801538467407,
        0.29122062027454376,
        0.35886213183403015,
        0.39672979712486267,
        0.456463098526001,
        0.5060557425022125,
        0.5177524238824844,
        0.5704159438610077,
    ],
    "rewards/rejected": [
        0.0,
        0.017019844613969326,
        0.02924974076449871,
        0.028014826588332653,
        0.033301446586847305,
        0.03247501887381077,
        0.016665959730744362,
        0.029389047995209694,
        0.009360981057398021,
        0.017002702690660954,
    ],
    "rewards/margins": [
        0.0,
        0.12359734252095222,
        0.21151826530694962,
        0.26320579648017883,
        0.32556067407131195,
        0.36425478756427765,
        0.43979714810848236,
        0.4766667038202286,
        0.5083914250135422,
        0.5534132421016693,
    ],
    "grad_norm": [
        1.5912116765975952,
        1.5526983737945557,
        1.3892971277236938,
        1.2638436555862427,
        1.107369303703308,
        1.228534460067749,
        1.0737366676330566,
        1.091617465019226,
        0.9943001866340637,
        1.115732192993164,
    ],
}


def golden_run(model_dir: Path, work: Path) -> dict[str, list[float]]:
    """The pinned run; its logged train rows, one list per key of ``KEYS``."""
    import torch
    from _tiny import make_tiny_llama, tiny_train_config, toy_pairs, write_jsonl

    from preftune.trainer import train

    if not (model_dir / "config.json").is_file():
        make_tiny_llama(model_dir, seed=0)
    data = write_jsonl(work / "pairs.jsonl", toy_pairs(64, seed=0))
    cfg = tiny_train_config(
        model_dir, data, work / "run",
        loss__name=["sigmoid", "sft"], loss__weights=[1.0, 0.5], loss__beta=0.1,
        train__batch_size=4, train__grad_accum=2, train__max_steps=STEPS, train__save_final=False,
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return {k: [float(r[k]) for r in rows] for k in KEYS}


def test_the_golden_run_is_unchanged(tiny_dir, tmp_path):
    got = golden_run(tiny_dir, tmp_path)
    for key in KEYS:
        assert got[key] == pytest.approx(GOLDEN[key], rel=REL, abs=ABS), key


if __name__ == "__main__":  # the derivation: prints GOLDEN for a fresh checkout (see the docstring)
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(tempfile.mkdtemp(prefix="golden-"))
    values = golden_run(work / "model", work)
    print("GOLDEN = {")
    for key in KEYS:
        print(f"    {key!r}: [")
        for v in values[key]:
            print(f"        {v!r},")
        print("    ],")
    print("}")
