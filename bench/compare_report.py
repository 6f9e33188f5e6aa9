"""compare.py's report: per-run and per-row summaries of the workers' raw records (timed steps only,
tokens from the data, ratios of neighbouring runs), the exactness summary, the markdown tables and the
machine's description. Stdlib only."""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import pair_token_counts
from compare_plan import EXACT_TARGET, GIB, REPO, Row, target_for

__all__ = [
    "environment",
    "markdown",
    "neighbour_ratios",
    "summarize_exact",
    "summarize_row",
    "summarize_run",
]


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
    ratios = neighbour_ratios(seq, ("tokens_per_s", "tokens_per_s_per_gflops", "peak_rss_gib"))
    out["ratios"] = {
        "tokens_per_s": _stats(ratios["tokens_per_s"]),
        "tokens_per_s_probe_normalized": _stats(ratios["tokens_per_s_per_gflops"]),
        "peak_rss": _stats(ratios["peak_rss_gib"]),
    }
    return out


def neighbour_ratios(seq: list[dict], keys: tuple[str, ...]) -> dict[str, list[float]]:
    """preftune ÷ the other system, per summary key, over each neighbouring pair of runs of ``seq`` (runs
    in the order they ran, two systems); a pair where either value is missing or zero gives no ratio."""
    out: dict[str, list[float]] = {k: [] for k in keys}
    for a, b in itertools.pairwise(seq):
        if a["system"] == b["system"]:
            continue
        p, t = (a, b) if a["system"] == "preftune" else (b, a)
        for key in keys:
            if p["summary"][key] and t["summary"][key]:
                out[key].append(p["summary"][key] / t["summary"][key])
    return out


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
