#!/usr/bin/env python
"""preftune vs TRL's DPOTrainer on identical inputs (issue 7): throughput, peak RSS, first-step exactness.

    python bench/compare.py --short        # <= 15 min: tiny and ~20M models (make bench)
    python bench/compare.py --full         # the whole table incl. SmolLM-135M shape (make bench-full)
    python bench/compare.py --list         # print the plan and exit
    python bench/compare.py --rows 'smol135m/prompt-heavy/512/.*' --rounds 3

The parent process only orchestrates (it never imports torch). Every system runs in its own child process
(``--worker preftune|trl``), A/B/A/B over several rounds, each on a fresh cache; see bench/README.md for the
method and the meaning of every column.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DATASETS,
    MODELS,
    bench_env,
    make_pairs,
    pair_token_counts,
    read_jsonl,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GIB = 1024**3
BATCH = 2  # pairs per optimizer step (issue 7)
BETA = 0.1
SEED = 42
# Targets of issue 7 (SmolLM-135M shape only): tokens/s ratio at 512, peak-RSS ratio at 1024.
SPEED_TARGETS = {"prompt-heavy": 2.5, "response-heavy": 1.3, "mixed": 1.5}
RSS_TARGETS = {"prompt-heavy": 0.5, "response-heavy": 0.75}
GC_RSS_TARGET_GIB = 12.0
EXACT_TARGET = 1e-4

# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Row:
    model: str
    dataset: str
    max_length: int
    mode: str  # default | precomputed | padded | gc | exact
    warmup: int = 1
    steps: int = 4
    rounds: int = 2
    lr: float = 1e-6
    systems: tuple[str, ...] = ("preftune", "trl")

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}/{self.max_length}/{self.mode}"

    @property
    def n_pairs(self) -> int:
        # Exactness: one batch of the first 2 pairs, repeated (2 steps). Timing: exactly one epoch, so both
        # systems train on the same pairs overall (each in its own shuffled order).
        return BATCH if self.mode == "exact" else BATCH * (self.warmup + self.steps)


MODES = {
    "default": "preftune defaults (reference auto = frozen copy; prefix sharing auto = on for Llama) vs TRL frozen reference copy",
    "precomputed": "preftune reference.strategy=precomputed vs TRL precompute_ref_log_probs=True",
    "padded": "preftune train.prefix_sharing=false (two padded rows per pair, as TRL) vs TRL frozen reference copy",
    "gc": "preftune only, model.gradient_checkpointing=true (default reference)",
    "exact": "first-step loss, policy and reference of different random inits, same 2 pairs",
}


def plan(kind: str) -> list[Row]:
    rows: list[Row] = []
    if kind == "short":
        rows.append(Row("tiny", "mixed", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
        rows.append(Row("20m", "prompt-heavy", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
        for ds in DATASETS:
            for mode in ("default", "precomputed"):
                rows.append(Row("tiny", ds, 512, mode, warmup=1, steps=4, rounds=2))
        rows.append(Row("tiny", "prompt-heavy", 512, "padded", warmup=1, steps=4, rounds=2))
        rows.append(Row("20m", "prompt-heavy", 512, "default", warmup=1, steps=3, rounds=2))
        rows.append(Row("20m", "prompt-heavy", 512, "precomputed", warmup=1, steps=3, rounds=2))
        return rows
    for model in ("tiny", "20m", "smol135m"):
        rows.append(Row(model, "prompt-heavy", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
    rows.append(Row("tiny", "mixed", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
    for model, (warmup, steps, rounds) in {
        "tiny": (2, 6, 3),
        "20m": (1, 5, 3),
        "smol135m": (1, 4, 2),
    }.items():
        for ds in DATASETS:
            for mode in ("default", "precomputed", "padded"):
                rows.append(Row(model, ds, 512, mode, warmup=warmup, steps=steps, rounds=rounds))
    for ds in ("prompt-heavy", "response-heavy"):  # the peak-RSS targets
        for mode in ("default", "precomputed"):
            rows.append(Row("smol135m", ds, 1024, mode, warmup=1, steps=3, rounds=2))
    rows.append(
        Row(
            "smol135m",
            "prompt-heavy",
            4096,
            "gc",
            warmup=1,
            steps=2,
            rounds=1,
            systems=("preftune",),
        )
    )
    return rows


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
# Summaries


def _stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize_run(result: dict, row: Row, data_rows: list[dict], meta: dict) -> dict:
    """Per-run numbers from the child's raw record: timed steps only, tokens from the data."""
    if "error" in result:
        return {"error": result["error"]}
    times = result["step_end_times"]
    w, n = row.warmup, row.steps
    if len(times) < w + n or w < 1:
        return {"error": f"recorded {len(times)} step ends, expected {w + n} (warm-up >= 1)"}
    step_s = [times[i] - times[i - 1] for i in range(w, w + n)]
    counts = [pair_token_counts(r) for r in data_rows]
    step_pairs = result["step_pairs"][w : w + n]
    step_tokens = [sum(sum(counts[i]) for i in pairs) for pairs in step_pairs]
    total_s = sum(step_s)
    tokens_per_s = sum(step_tokens) / total_s if total_s > 0 else float("nan")
    live_ref = result.get("reference") not in ("precomputed",)
    per_token_flops = (6 + (2 if live_ref else 0)) * meta["params_matmul"]
    flops_per_s = per_token_flops * tokens_per_s
    probes = [p for p in (result.get("matmul_before"), result.get("matmul_after")) if p]
    peak = statistics.mean(probes) * 1e9 if probes else float("nan")
    return {
        "step_s": _stats(step_s),
        "step_s_all": step_s,
        "step_tokens": step_tokens,
        "tokens_per_s": tokens_per_s,
        "peak_rss_gib": (result.get("peak_rss_train_kib") or 0) * 1024 / GIB,
        "peak_rss_process_gib": (result.get("peak_rss_end_kib") or 0) * 1024 / GIB,
        "model_gflops": flops_per_s / 1e9,
        "share_of_matmul_peak": flops_per_s / peak if peak == peak else None,
        "matmul_before": result.get("matmul_before"),
        "matmul_after": result.get("matmul_after"),
        "tokens_per_s_per_gflops": tokens_per_s / statistics.mean(probes) if probes else None,
        "reference": result.get("reference"),
        "tokens_match_data": result.get("tokens_match_data"),
        "setup_s": result.get("setup_s"),
    }


def summarize_row(row: Row, runs: list[dict]) -> dict:
    """Per-system aggregates and preftune/TRL ratios from NEIGHBOURING runs only."""
    out: dict[str, Any] = {"systems": {}}
    for system in row.systems:
        ok = [r["summary"] for r in runs if r["system"] == system and "error" not in r["summary"]]
        if not ok:
            continue
        all_steps = [s for r in ok for s in r["step_s_all"]]
        out["systems"][system] = {
            "runs": len(ok),
            "step_s": _stats(all_steps),
            "tokens_per_s": _stats([r["tokens_per_s"] for r in ok]),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in ok),
            "peak_rss_process_gib": max(r["peak_rss_process_gib"] for r in ok),
            "model_gflops": _stats([r["model_gflops"] for r in ok]),
            "share_of_matmul_peak": _stats(
                [r["share_of_matmul_peak"] for r in ok if r["share_of_matmul_peak"] is not None]
            ),
            "matmul_gflops": _stats(
                [p for r in ok for p in (r["matmul_before"], r["matmul_after"]) if p]
            ),
            "reference": ok[0]["reference"],
        }
    if len(row.systems) < 2:
        return out
    seq = [r for r in runs if "error" not in r["summary"]]
    tput, norm, rss = [], [], []
    for a, b in itertools.pairwise(seq):
        if a["system"] == b["system"]:
            continue
        p, t = (a, b) if a["system"] == "preftune" else (b, a)
        ps, ts = p["summary"], t["summary"]
        tput.append(ps["tokens_per_s"] / ts["tokens_per_s"])
        if ps["tokens_per_s_per_gflops"] and ts["tokens_per_s_per_gflops"]:
            norm.append(ps["tokens_per_s_per_gflops"] / ts["tokens_per_s_per_gflops"])
        if ts["peak_rss_gib"]:
            rss.append(ps["peak_rss_gib"] / ts["peak_rss_gib"])
    out["ratios"] = {
        "tokens_per_s": _stats(tput),
        "tokens_per_s_probe_normalized": _stats(norm),
        "peak_rss": _stats(rss),
    }
    return out


def target_for(row: Row) -> tuple[str, float, str] | None:
    """(metric, bound, direction) of issue 7 that this row is judged on, if any."""
    if row.mode == "exact":
        return ("rel_diff", EXACT_TARGET, "<=")
    if row.model != "smol135m":
        return None
    if row.mode == "gc":
        return ("peak_rss_gib", GC_RSS_TARGET_GIB, "<=")
    if row.max_length == 512 and row.mode in ("default", "precomputed", "padded"):
        return ("tokens_per_s", SPEED_TARGETS[row.dataset], ">=")
    if row.max_length == 1024 and row.dataset in RSS_TARGETS:
        return ("peak_rss", RSS_TARGETS[row.dataset], "<=")
    return None


def summarize_exact(row: Row, runs: list[dict]) -> dict:
    by = {r["system"]: r for r in runs}
    out: dict[str, Any] = {}
    if any("error" in by.get(s, {"error": 1}) for s in ("preftune", "trl")):
        out["error"] = {s: by.get(s, {}).get("error") for s in ("preftune", "trl")}
        return out
    p, t = by["preftune"], by["trl"]
    steps = []
    for i in range(min(len(p["losses"]), len(t["losses"]))):
        lp, lt = p["losses"][i], t["losses"][i]
        steps.append(
            {
                "step": i + 1,
                "loss_preftune": lp,
                "loss_trl": lt,
                "rel_diff": abs(lp - lt) / max(abs(lt), 1e-12),
                "logps_chosen_mean": (p["logps_chosen_mean"][i], t["logps_chosen_mean"][i]),
                "logps_rejected_mean": (p["logps_rejected_mean"][i], t["logps_rejected_mean"][i]),
            }
        )
    f = by.get("fp64", {})
    if steps and "loss" in f:
        out["loss_fp64"] = f["loss"]
        steps[0]["rel_diff_fp64"] = {
            "preftune": abs(steps[0]["loss_preftune"] - f["loss"]) / abs(f["loss"]),
            "trl": abs(steps[0]["loss_trl"] - f["loss"]) / abs(f["loss"]),
        }
    out["steps"] = steps
    out["same_pairs_step1"] = sorted(p["step_pairs"][0]) == sorted(t["step_pairs"][0])
    out["tokens_match_data"] = {
        "preftune": p.get("tokens_match_data"),
        "trl": t.get("tokens_match_data"),
    }
    return out


# ---------------------------------------------------------------------------------------------------
# Output


def _fmt_stats(s: dict | None, spec: str = ".2f") -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return format(s["median"], spec)
    return f"{format(s['median'], spec)} [{format(s['min'], spec)}–{format(s['max'], spec)}]"


def _check(value: float | None, bound: float, direction: str) -> str:
    if value is None:
        return "?"
    ok = value >= bound if direction == ">=" else value <= bound
    return "met" if ok else "MISSED"


def markdown(results: list[dict]) -> str:
    lines = [
        "### Per system (timed steps after warm-up; tokens from the data, each prompt once)",
        "",
    ]
    lines.append(
        "| row | system | reference | s/step median [min–max] | tokens/s median [min–max] | "
        "peak RSS GiB | model GFLOP/s | % of matmul peak | matmul GFLOP/s [min–max] |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        row = Row(**res["row"])
        if row.mode == "exact" or "skipped" in res:
            continue
        for system, s in res["summary"].get("systems", {}).items():
            share = s["share_of_matmul_peak"]
            lines.append(
                f"| {row.name} | {system} | {s['reference']} | {_fmt_stats(s['step_s'], '.3f')} | "
                f"{_fmt_stats(s['tokens_per_s'], '.0f')} | {s['peak_rss_gib']:.2f} | "
                f"{_fmt_stats(s['model_gflops'], '.1f')} | "
                f"{_fmt_stats({k: v * 100 if k != 'n' else v for k, v in share.items()}, '.0f') if share else '–'} | "
                f"{_fmt_stats(s['matmul_gflops'], '.0f')} |"
            )
        for system in row.systems:
            if system not in res["summary"].get("systems", {}):
                lines.append(f"| {row.name} | {system} | – | FAILED (see JSON/log) | | | | | |")
    lines += ["", "### preftune / TRL (ratios of neighbouring runs, median [min–max])", ""]
    lines.append(
        "| row | tokens/s ratio | probe-normalized tokens/s ratio | peak RSS ratio | issue-7 target |"
    )
    lines.append("|---|---|---|---|---|")
    for res in results:
        row = Row(**res["row"])
        if "skipped" in res:
            lines.append(f"| {row.name} | skipped: {res['skipped']} | | | |")
            continue
        if row.mode == "exact":
            continue
        tgt = target_for(row)
        if len(row.systems) < 2:
            if tgt:
                peak = res["summary"]["systems"].get("preftune", {}).get("peak_rss_gib")
                lines.append(
                    f"| {row.name} | (preftune only) | | peak {peak:.2f} GiB | "
                    f"≤ {tgt[1]} GiB: {_check(peak, tgt[1], tgt[2])} |"
                    if peak
                    else f"| {row.name} | FAILED | | | |"
                )
            continue
        r = res["summary"].get("ratios", {})
        target = "–"
        if tgt:
            metric, bound, direction = tgt
            val = (r.get(metric) or {}).get("median")
            target = f"{metric} {direction} {bound}: {_check(val, bound, direction)}"
        lines.append(
            f"| {row.name} | {_fmt_stats(r.get('tokens_per_s'))} | "
            f"{_fmt_stats(r.get('tokens_per_s_probe_normalized'))} | "
            f"{_fmt_stats(r.get('peak_rss'))} | {target} |"
        )
    exact = [res for res in results if res["row"]["mode"] == "exact" and "skipped" not in res]
    if exact:
        lines += ["", "### Exactness: loss of the same batch (policy ≠ reference inits)", ""]
        lines.append(
            "| model/data | step | loss preftune | loss TRL | rel. diff | fp64 loss: rel. diff preftune, TRL | "
            f"same pairs, same tokens | target ≤ {EXACT_TARGET:g} (step 1) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for res in exact:
            row = Row(**res["row"])
            s = res["summary"]
            if "error" in s:
                lines.append(f"| {row.model}/{row.dataset} | – | FAILED: {s['error']} | | | | | |")
                continue
            tm = s["tokens_match_data"]
            same = f"{s['same_pairs_step1']}, {tm['preftune'] and tm['trl']}"
            for st in s["steps"]:
                verdict = (
                    _check(st["rel_diff"], EXACT_TARGET, "<=")
                    if st["step"] == 1
                    else "(after 1 update)"
                )
                f64 = st.get("rel_diff_fp64")
                f64_text = (
                    f"{s['loss_fp64']:.8f}: {f64['preftune']:.1e}, {f64['trl']:.1e}" if f64 else "–"
                )
                lines.append(
                    f"| {row.model}/{row.dataset} | {st['step']} | {st['loss_preftune']:.8f} | "
                    f"{st['loss_trl']:.8f} | {st['rel_diff']:.2e} | {f64_text} | {same} | {verdict} |"
                )
    return "\n".join(lines)


def environment() -> dict:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": "PASSIVE",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        env["cpu"] = next(
            (x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), None
        )
        flags = next((x.split(":", 1)[1].split() for x in info if x.startswith("flags")), [])
        env["cpu_simd"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except (OSError, IndexError):
        pass
    try:
        env["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        env["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "trl", "datasets", "accelerate", "preftune"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


# ---------------------------------------------------------------------------------------------------
# Workers (child side): each records raw timings; the parent turns them into numbers.


class Recorder:
    """Step-end timestamps, the pairs of each step, losses and peak RSS, recorded inside a child."""

    def __init__(self, spec: dict):
        from _common import pair_token_counts  # noqa: F401  (documents where counts come from)

        self.total = spec["warmup"] + spec["steps"]
        self.step_end_times: list[float] = []
        self.step_pairs: list[list[int]] = []
        self.losses: list[Any] = []
        self.logps_chosen: list[Any] = []
        self.logps_rejected: list[Any] = []
        self.peak_rss_train_kib: int | None = None
        self.tokens_match = True
        rows = read_jsonl(Path(spec["data_file"]))
        # Token ids straight from the data: BOS=1, "w<id>" -> id, EOS=2 (the word-level tokenizer).
        self.expected = []
        self.by_chosen_row: dict[tuple[int, ...], int] = {}
        for i, r in enumerate(rows):
            p = [1] + [int(w[1:]) for w in r["prompt"].split()]
            c = [int(w[1:]) for w in r["chosen"].split()] + [2]
            j = [int(w[1:]) for w in r["rejected"].split()] + [2]
            self.expected.append((p, c, j))
            self.by_chosen_row[tuple(p + c)] = i

    def step_end(self) -> None:
        self.step_end_times.append(time.perf_counter())
        if len(self.step_end_times) == self.total:
            from _common import peak_rss_kib

            self.peak_rss_train_kib = peak_rss_kib()

    def batch(self, input_ids, attention_mask, completion_mask, index=None) -> None:
        """Identify the pairs of a padded [2B, T] batch from its chosen rows; check every token."""
        rows = input_ids.shape[0]
        b = rows // 2
        pairs = []
        for k in range(b):
            n = int(attention_mask[k].sum())
            key = tuple(input_ids[k, :n].tolist())
            i = self.by_chosen_row.get(key)
            if i is None and index is not None:
                i = int(index[k])
                self.tokens_match = False
            if i is None:
                self.tokens_match = False
                continue
            p, c, r = self.expected[i]
            n_r = int(attention_mask[b + k].sum())
            if input_ids[b + k, :n_r].tolist() != p + r:
                self.tokens_match = False
            if int(completion_mask[k].sum()) != len(c) or int(completion_mask[b + k].sum()) != len(
                r
            ):
                self.tokens_match = False
            pairs.append(i)
        self.step_pairs.append(pairs)

    def dump(self, path: Path, **extra) -> None:
        def num(x):
            return float(x) if x is not None else None

        out = {
            "step_end_times": self.step_end_times,
            "step_pairs": self.step_pairs,
            "losses": [num(x) for x in self.losses],
            "logps_chosen_mean": [num(x) for x in self.logps_chosen],
            "logps_rejected_mean": [num(x) for x in self.logps_rejected],
            "peak_rss_train_kib": self.peak_rss_train_kib,
            "tokens_match_data": self.tokens_match,
            **extra,
        }
        Path(path).write_text(json.dumps(out, indent=1))


_STEP_END_HOOK = None
_TIMED_CLASSES: dict[type, type] = {}


def _timed_scheduler_class(base: type) -> type:
    """A module-level-cached subclass of ``base`` whose ``step`` calls the harness hook afterwards."""
    if base not in _TIMED_CLASSES:

        def step(self, *args, **kwargs):
            result = base.step(self, *args, **kwargs)
            if _STEP_END_HOOK is not None:
                _STEP_END_HOOK()
            return result

        _TIMED_CLASSES[base] = type(f"Timed{base.__name__}", (base,), {"step": step})
    return _TIMED_CLASSES[base]


def worker_prepare(spec: dict) -> None:
    from _common import build_model_folder

    build_model_folder(Path(spec["out_dir"]), spec["model"], seed=spec["seed"])


def worker_preftune(spec: dict, out: Path) -> None:
    from _common import matmul_gflops, peak_rss_kib

    probe_before = matmul_gflops()
    t0 = time.perf_counter()
    import torch

    import preftune.build as pbuild
    import preftune.trainer as ptrainer
    from preftune.config import (
        apply_overrides,
        config_from_dict,
        resolved_reference_strategy,
        validate,
    )

    rec = Recorder(spec)
    work = Path(spec["work"])
    mode = spec["mode"]
    cfg = config_from_dict(
        {
            "model": {
                "path": spec["model_dir"],
                "gradient_checkpointing": mode == "gc",
            },
            "data": {
                "train_files": [spec["data_file"]],
                "max_length": spec["max_length"],
                "max_prompt_length": None,  # TRL 1.16 has no prompt limit; every row fits max_length
                "cache_dir": str(work / "cache"),
            },
            "loss": {"name": ["sigmoid"], "beta": BETA},
            "reference": {
                "strategy": "precomputed" if mode == "precomputed" else "auto",
                "path": spec["ref_model_dir"],
                "batch_size": spec["batch"],  # as TRL: precompute_ref_batch_size = per-device batch
                "cache_dir": str(work / "cache"),
            },
            "optim": {
                "lr": spec["lr"],
                "scheduler": "linear",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
            },
            "train": {
                "output_dir": str(work / "run"),
                "seed": spec["seed"],
                "max_steps": spec["warmup"] + spec["steps"],
                "batch_size": spec["batch"],
                "grad_accum": 1,
                "device": "cpu",
                "resume": "never",
                "save_final": False,
            },
            "log": {"log_every": 1, "progress": False, "report_to": []},
        }
    )
    if mode == "padded":
        cfg.train.prefix_sharing = False
    apply_overrides(cfg, spec.get("preftune_set") or [])
    validate(cfg)

    # Harness hooks (this process only; no library code is changed):
    # step end = right after the scheduler step, the last thing of an optimizer step. The scheduler's class is
    # swapped for a subclass (not an instance attribute) so that checkpoints can still pickle its state.
    global _STEP_END_HOOK
    _STEP_END_HOOK = rec.step_end
    orig_scheduler = pbuild.build_scheduler

    def build_scheduler(*a, **k):
        sched = orig_scheduler(*a, **k)
        sched.__class__ = _timed_scheduler_class(type(sched))
        return sched

    pbuild.build_scheduler = build_scheduler

    orig_window = ptrainer.window_backward

    def window_backward(model, reference, micro, loss_fn, **kw):
        for b in micro:
            if hasattr(b, "attention_mask"):  # padded rows
                rec.batch(b.input_ids, b.attention_mask, b.completion_mask, b.index)
            else:  # the shared-prompt layout: fall back to the data index
                rec.step_pairs.append([int(i) for i in b.index])
        return orig_window(model, reference, micro, loss_fn, **kw)

    ptrainer.window_backward = window_backward

    orig_loss = pbuild.build_loss_fn

    def build_loss_fn(*a, **k):
        fn = orig_loss(*a, **k)

        def loss_fn(*la, **lk):
            out = fn(*la, **lk)
            if len(rec.losses) < 4:  # exactness needs the first steps; keep the loop free of syncs
                rec.losses.append(out.losses.detach().double().mean())
                rec.logps_chosen.append(la[0].detach().double().mean())
                rec.logps_rejected.append(la[1].detach().double().mean())
            return out

        return loss_fn

    pbuild.build_loss_fn = build_loss_fn

    torch.manual_seed(spec["seed"])
    ptrainer.train(cfg)
    probe_after = matmul_gflops()
    if len(rec.step_pairs) > len(rec.step_end_times):  # a window of several micro-batches
        rec.step_pairs = rec.step_pairs[: len(rec.step_end_times)]
    first_step = rec.step_end_times[0] if rec.step_end_times else time.perf_counter()
    rec.dump(
        out,
        system="preftune",
        reference=resolved_reference_strategy(cfg),
        flags={
            "prefix_sharing": cfg.train.prefix_sharing,
            "chunk_size": cfg.train.chunk_size,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "compile": cfg.train.compile,
            "overrides": spec.get("preftune_set") or [],
        },
        matmul_before=probe_before,
        matmul_after=probe_after,
        setup_s=first_step - t0,
        peak_rss_end_kib=peak_rss_kib(),
        threads=torch.get_num_threads(),
    )


def worker_trl(spec: dict, out: Path) -> None:
    from _common import matmul_gflops, peak_rss_kib

    probe_before = matmul_gflops()
    t0 = time.perf_counter()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rec = Recorder(spec)
    work = Path(spec["work"])
    mode = spec["mode"]
    if mode not in ("default", "precomputed", "padded", "exact"):
        raise ValueError(f"TRL has no counterpart of mode {mode!r}")

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end()

    orig_compute_loss = DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = orig_compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            rec.batch(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            if len(rec.losses) < 4:
                loss = result[0] if isinstance(result, tuple) else result
                rec.losses.append(loss.detach().double())
                metrics = self._metrics["train"]
                rec.logps_chosen.append(metrics["logps/chosen"][-1])
                rec.logps_rejected.append(metrics["logps/rejected"][-1])
        return result

    DPOTrainer.compute_loss = compute_loss

    dataset = load_dataset(
        "json", data_files=spec["data_file"], split="train", cache_dir=str(work / "hf")
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    ref_model = None
    if spec["ref_model_dir"]:
        ref_model = AutoModelForCausalLM.from_pretrained(
            spec["ref_model_dir"], dtype=torch.float32, attn_implementation="sdpa"
        )
    args = DPOConfig(
        output_dir=str(work / "out"),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        loss_type=["sigmoid"],
        beta=BETA,
        max_length=spec["max_length"],
        truncation_mode="keep_start",
        padding_free=False,  # disabled in 1.16 anyway (warns and pads)
        precompute_ref_log_probs=mode == "precomputed",
        precompute_ref_batch_size=spec["batch"],
        gradient_checkpointing=False,  # DPOConfig defaults to True
        bf16=False,  # DPOConfig defaults to True
        fp16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        remove_unused_columns=True,
        seed=spec["seed"],
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    probe_after = matmul_gflops()
    first_step = rec.step_end_times[0] if rec.step_end_times else time.perf_counter()
    rec.dump(
        out,
        system="trl",
        reference="precomputed" if mode == "precomputed" else "copy",
        flags={
            "optim": str(args.optim),
            "gradient_checkpointing": args.gradient_checkpointing,
            "padding_free": args.padding_free,
            "bf16": args.bf16,
        },
        matmul_before=probe_before,
        matmul_after=probe_after,
        setup_s=first_step - t0,
        peak_rss_end_kib=peak_rss_kib(),
        threads=torch.get_num_threads(),
    )


def worker_fp64(spec: dict, out: Path) -> None:
    """The step-1 loss of the exactness batch in float64 with plain full logits: the judge of both systems."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    rec = Recorder(spec)
    pairs = rec.expected[: spec["batch"]]
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    starts = [len(p) for p, _, _ in pairs] * 2

    def logps(path: str) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, attn_implementation="eager"
        )
        model.eval()
        sums = []
        with torch.no_grad():
            for seq, start in zip(seqs, starts):  # one row at a time: no padding at all
                ids = torch.tensor([seq])
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
                picked = logp.gather(1, ids[0, 1:, None])[:, 0]
                sums.append(picked[start - 1 :].sum())
        return torch.stack(sums)

    pol = logps(spec["model_dir"])
    ref = logps(spec["ref_model_dir"])
    b = len(pairs)
    margin = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    loss = -F.logsigmoid(BETA * margin).mean()
    Path(out).write_text(
        json.dumps(
            {
                "system": "fp64",
                "loss": float(loss),
                "logps_chosen_mean": float(pol[:b].mean()),
                "logps_rejected_mean": float(pol[b:].mean()),
            }
        )
    )


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
    ap.add_argument("--workdir", help="where models, data and logs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--out", help="JSON output path (default bench/results/compare-<kind>-<time>.json)"
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) if args.out else RESULTS / f"compare-{kind}-{stamp}.json"
    bench = Bench(workdir, RESULTS / f"logs-{kind}-{stamp}", args.preftune_set)
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
