#!/usr/bin/env python
"""preftune vs TRL's DPOTrainer on identical inputs (issue 7): throughput, peak RSS, first-step exactness.

    python bench/compare.py --short        # <= 15 min: tiny and ~20M models (make bench)
    python bench/compare.py --full         # the whole table incl. SmolLM-135M shape (make bench-full)
    python bench/compare.py --list         # print the plan and exit
    python bench/compare.py --rows 'smol135m/prompt-heavy/512/.*' --rounds 3

The parent process only orchestrates (it never imports torch). Every system runs in its own child process
(``--worker preftune|trl``), A/B/A/B over several rounds, each on a fresh cache; see bench/README.md for the
method and the meaning of every column. The pieces: :mod:`compare_plan` (rows, settings, targets),
:mod:`compare_workers` (the child side: one system's run, recorded), :mod:`compare_report` (summaries and
tables); this file runs the children and is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MODELS, bench_env, make_pairs, read_jsonl, write_jsonl
from compare_plan import BATCH, BETA, MODES, REPO, SEED, Row, plan
from compare_report import (
    _stats,
    environment,
    markdown,
    summarize_exact,
    summarize_row,
    summarize_run,
)
from compare_workers import (
    Recorder,
    worker_fp64,
    worker_preftune,
    worker_prepare,
    worker_trl,
)

# What bench/gpu_check.py (and any other harness) takes from here: the plan's settings, the summaries and
# the workers.
__all__ = [
    "BATCH",
    "BETA",
    "SEED",
    "Recorder",
    "Row",
    "_stats",
    "main",
    "plan",
    "summarize_run",
    "worker_preftune",
    "worker_trl",
]

RESULTS = REPO / "bench" / "results"

# ---------------------------------------------------------------------------------------------------
# Child processes


def _run_child(args: list[str], log_path: Path) -> tuple[int, int, float]:
    """Run ``compare.py --worker ...``; return (exit code, ru_maxrss KiB from wait4, wall seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            cwd=REPO,
            env=bench_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss), time.perf_counter() - t0


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Bench:
    def __init__(self, workdir: Path, logs: Path, preftune_set: list[str]):
        self.workdir = workdir
        self.preftune_set = preftune_set
        self.models: dict[str, dict] = {}
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.counter = 0

    def model_dir(self, name: str, seed: int = 0) -> tuple[Path, dict]:
        key = f"{name}-seed{seed}"
        path = self.workdir / "models" / key
        if key not in self.models:
            spec = {"out_dir": str(path), "model": name, "seed": seed}
            spec_path = self.workdir / f"prepare-{key}.json"
            spec_path.write_text(json.dumps(spec))
            log = self.logs / f"prepare-{key}.log"
            rc, _, wall = _run_child(["--worker", "prepare", "--spec", str(spec_path)], log)
            if rc != 0:
                raise RuntimeError(f"building model {key} failed:\n{_tail(log)}")
            self.models[key] = json.loads((path / "bench_meta.json").read_text())
            print(
                f"  built {key}: {self.models[key]['params_total'] / 1e6:.1f}M params ({wall:.0f}s)"
            )
        return path, self.models[key]

    def data_file(self, row: Row, vocab: int) -> Path:
        path = self.workdir / "data" / f"{row.dataset}-{row.max_length}-{row.n_pairs}.jsonl"
        if not path.exists():
            rows = make_pairs(
                row.dataset, row.n_pairs, max_length=row.max_length, vocab_size=vocab, seed=SEED
            )
            write_jsonl(path, rows)
        return path

    def run(self, system: str, row: Row, model_dir: Path, data: Path, ref_dir: Path | None) -> dict:
        self.counter += 1
        tag = f"{self.counter:03d}-{system}-{row.name.replace('/', '_')}"
        work = self.workdir / "runs" / tag
        work.mkdir(parents=True, exist_ok=True)
        spec = {
            "model_dir": str(model_dir),
            "ref_model_dir": str(ref_dir) if ref_dir else None,
            "data_file": str(data),
            "max_length": row.max_length,
            "mode": row.mode,
            "warmup": row.warmup,
            "steps": row.steps,
            "batch": BATCH,
            "lr": row.lr,
            "seed": SEED,
            "work": str(work),
            "preftune_set": self.preftune_set,
        }
        spec_path, out_path = work / "spec.json", work / "result.json"
        spec_path.write_text(json.dumps(spec))
        log = self.logs / f"{tag}.log"
        rc, ru_maxrss, wall = _run_child(
            ["--worker", system, "--spec", str(spec_path), "--out", str(out_path)], log
        )
        if rc != 0 or not out_path.exists():
            result = {"system": system, "error": f"exit code {rc}", "log_tail": _tail(log)}
        else:
            result = json.loads(out_path.read_text())
        result["wall_s"] = wall
        result["ru_maxrss_kib"] = ru_maxrss
        result["log"] = str(log)
        shutil.rmtree(work, ignore_errors=True)  # caches and checkpoints: not needed, can be large
        return result


# ---------------------------------------------------------------------------------------------------
# Parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--short", action="store_true", help="tiny and ~20M rows (default)")
    group.add_argument("--full", action="store_true", help="every row incl. SmolLM-135M shape")
    ap.add_argument("--rows", help="only rows whose name matches this regex (model/data/len/mode)")
    ap.add_argument("--rounds", type=int, help="override rounds (A/B pairs) per row")
    ap.add_argument("--steps", type=int, help="override timed steps per run")
    ap.add_argument("--warmup", type=int, help="override warm-up steps per run (>= 1)")
    ap.add_argument(
        "--preftune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra preftune config override for every preftune run (repeatable)",
    )
    ap.add_argument(
        "--systems",
        help="comma-separated systems to run, of each row's (e.g. preftune where TRL is not installed)",
    )
    ap.add_argument("--workdir", help="where models, data and logs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--out", help="JSON output path (default bench/results/compare-<kind>-<time>.json)"
    )
    ap.add_argument(
        "--logs", help="folder of the children's logs (default bench/results/logs-<kind>-<time>)"
    )
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument(
        "--worker", choices=("prepare", "preftune", "trl", "fp64"), help=argparse.SUPPRESS
    )
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        out = Path(args.out) if args.out else None
        if args.worker == "prepare":
            worker_prepare(spec)
        elif args.worker == "preftune":
            worker_preftune(spec, out)
        elif args.worker == "fp64":
            worker_fp64(spec, out)
        else:
            worker_trl(spec, out)
        return 0

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    kind = "full" if args.full else "short"
    rows = plan(kind)
    if args.rows:
        rows = [r for r in rows if re.search(args.rows, r.name)]
    if args.systems:
        keep = set(args.systems.split(","))
        rows = [r for r in rows if r.mode != "exact" or {"preftune", "trl"} <= keep]
        for r in rows:
            r.systems = tuple(s for s in r.systems if s in keep)
        rows = [r for r in rows if r.systems]
    for r in rows:
        if r.mode == "exact":
            continue
        r.rounds = args.rounds or r.rounds
        r.steps = args.steps or r.steps
        r.warmup = max(1, args.warmup) if args.warmup is not None else r.warmup
    if args.list or not rows:
        for r in rows:
            print(
                f"{r.name:40s} systems={','.join(r.systems)} warmup={r.warmup} steps={r.steps} "
                f"rounds={r.rounds} pairs={r.n_pairs}"
            )
        if not rows:
            print("no rows match", file=sys.stderr)
            return 2
        return 0

    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="preftune-bench-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) if args.out else RESULTS / f"compare-{kind}-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs) if args.logs else RESULTS / f"logs-{kind}-{stamp}"
    bench = Bench(workdir, logs, args.preftune_set)
    doc: dict[str, Any] = {
        "kind": kind,
        "environment": environment(),
        "settings": {
            "batch_pairs": BATCH,
            "beta": BETA,
            "loss": "sigmoid",
            "dtype": "float32",
            "optimizer": "AdamW (preftune: fused/foreach; TRL: TrainingArguments default)",
            "preftune_set": args.preftune_set,
            "modes": MODES,
            "models": {k: v for k, v in MODELS.items()},
        },
        "workdir": str(workdir),
        "rows": [],
    }
    print(
        f"preftune vs TRL ({kind}): {len(rows)} rows; work folder {workdir}; logs in {bench.logs}"
    )
    t_start = time.perf_counter()
    try:
        for row in rows:
            res: dict[str, Any] = {"row": asdict(row)}
            doc["rows"].append(res)
            model_dir, meta = bench.model_dir(row.model)
            res["model"] = meta
            ref_dir = bench.model_dir(row.model, seed=1)[0] if row.mode == "exact" else None
            data = bench.data_file(row, MODELS[row.model]["vocab_size"])
            data_rows = read_jsonl(data)
            runs = []
            order = [s for _ in range(row.rounds) for s in row.systems]
            if row.mode == "exact":
                order.append("fp64")
            for system in order:
                result = bench.run(system, row, model_dir, data, ref_dir)
                if row.mode != "exact":
                    result["summary"] = summarize_run(result, row, data_rows, meta)
                    s = result["summary"]
                    msg = (
                        f"error: {s['error']} ({result.get('log')})"
                        if "error" in s
                        else f"{s['step_s']['median']:.3f} s/step, {s['tokens_per_s']:.0f} tok/s, "
                        f"{s['peak_rss_gib']:.2f} GiB, matmul {s['matmul_before']:.0f}->"
                        f"{s['matmul_after']:.0f} GFLOP/s"
                    )
                else:
                    msg = result.get("error") or f"losses {result.get('losses') or result['loss']}"
                print(f"- {row.name} {system}: {msg}  [{result['wall_s']:.0f}s]", flush=True)
                runs.append(result)
            res["runs"] = runs
            res["summary"] = (
                summarize_exact(row, runs) if row.mode == "exact" else summarize_row(row, runs)
            )
            out_path.write_text(json.dumps(doc, indent=1, default=str))  # partial results survive
    finally:
        doc["total_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(doc, indent=1, default=str))
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(markdown(doc["rows"]))
    print(f"\nJSON: {out_path}  (total {doc['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
