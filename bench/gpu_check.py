#!/usr/bin/env python
"""One prepared GPU check (issue 17): correctness on CUDA, then preftune vs TRL 1.16 side by side.

    bash bench/gpu_check.sh                 # on the lent GPU machine: <= 8 minutes, JSON + markdown in $OUT
    bash bench/gpu_check.sh --dry-run       # on CPU: tiny model, 1 timed step per system, well under a minute
    python bench/gpu_check.py --help        # every option (batch, rounds, steps, budget, systems, ...)

Stages, each with its own timeout inside one overall time budget (``--budget``, default 450 s; what is left
when the budget runs out is skipped and said so, and the files are rewritten after every stage and run):

1. install: ``pip install --no-index --find-links bench/.wheels`` of what the machine lacks (datasets, TRL
   1.16, Liger-Kernel; see ``bench/gpu_wheels.sh``). Never in a dry run.
2. pytest: ``pytest -m gpu`` (the CUDA subset, ``tests/test_gpu.py`` and any other ``gpu``-marked test).
3. prepare: a random-init Llama-3.2-1B-shaped model folder (fp32 safetensors + word-level tokenizer, as
   ``bench/compare.py`` builds its models) and the device's facts (name, memory, a bf16 matmul probe).
4. bench: preftune vs TRL's ``DPOTrainer`` (and TRL + Liger kernels where Liger imports) on prompt-heavy and
   response-heavy pairs at 2048 tokens, bf16 autocast over fp32 master weights for both, the same batch for
   all systems, sized so that TRL (the hungrier) fills the GPU. Same process rules as ``compare.py``: every
   run is a fresh child process; runs of a row alternate (TRL, preftune, TRL+Liger, then the reverse) and
   ratios are taken between neighbouring runs only; tokens/s counts the tokens of the pairs trained in the
   timed steps, from the data, each prompt once.

The children ARE ``compare.py``'s workers (``worker_preftune``/``worker_trl``), imported and run with
harness-only shims for CUDA (see ``_cuda_shims``): the device and bf16 passed through preftune overrides and
TRL's ``DPOConfig``; step ends synchronize the device; ``torch.cuda.max_memory_allocated`` at the end of the
last timed step; the matmul probe is a bf16 8192^3 product on the GPU; preftune's final checkpoint write
(15 GB for this shape, after the timed steps) is skipped. No library code is changed.

Outputs under ``$OUT`` (default ``./gpu-check-out``): ``gpu_check.json`` (everything), ``gpu_check.md``
(the tables), ``gpu_check.log`` (this driver), ``pytest.txt`` and ``children.log`` (the child processes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import compare  # noqa: E402  (stdlib + _common only: the parent never imports torch)
import compare_report  # noqa: E402
import compare_workers  # noqa: E402
from _common import (  # noqa: E402
    MODELS,
    bench_env,
    make_pairs,
    pair_token_counts,
    read_jsonl,
    write_jsonl,
)

GIB = 1024**3
SCHEMA = 1

# Llama-3.2-1B's shape (rope scaling left out: it changes no FLOP and no byte). Registered in _common's
# table for this process and the children that import this file.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
MODELS.setdefault("llama1b", LLAMA_1B)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched as substrings
# of torch.cuda.get_device_name() in this order (GH200 before H200, H100 PCIe/NVL before H100, ...). A GPU
# not listed is judged against the bf16 matmul probe measured in the prepare stage.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
]

# Issue 17's targets on GPU.
SPEED_TARGETS = {"prompt-heavy": 2.0, "response-heavy": 1.3}
MEMORY_TARGET = 0.5
MFU_TARGET = 0.40

# Batch sizing. Saved activations of a Llama decoder layer under bf16 autocast, measured with
# saved_tensors_hooks (fp32 residual stream and norms, bf16 matmul inputs, SDPA): 71 bytes per token per
# unit of hidden size; 80 leaves room for the backward's transients. Static: fp32 weights, gradients and
# AdamW moments (16 B/param), the fp32 reference copy (4) and the bf16 weight copies autocast keeps for
# the policy and makes for the reference (2 + 2).
ACT_BYTES_PER_TOKEN_LAYER_HIDDEN = 80
STATIC_BYTES_PER_PARAM = 24
FILL = (
    0.80  # share of the GPU's memory the hungrier system (TRL: two padded rows per pair) may take
)
MAX_BATCH = 64

SYSTEM_ORDER = (
    "trl",
    "preftune",
    "trl-liger",
)  # round 1; round 2 reversed: preftune between the two

# ---------------------------------------------------------------------------------------------------
# Plans


def plan_settings(args) -> dict:
    dry = args.dry_run
    return {
        "mode": "dry-run" if dry else "gpu",
        "device": args.device or ("cpu" if dry else "cuda"),
        "model": args.model or ("tiny" if dry else "llama1b"),
        "max_length": args.max_length or (256 if dry else 2048),
        # one row in a dry run: it checks the machinery, and TRL's start-up alone takes ~10 s on CPU
        "datasets": args.datasets
        or (["prompt-heavy"] if dry else ["prompt-heavy", "response-heavy"]),
        "batch": args.batch,  # None: sized from the GPU's memory
        "warmup": args.warmup if args.warmup is not None else (1 if dry else 2),
        "steps": args.steps or (1 if dry else 6),
        "rounds": args.rounds or (1 if dry else 2),
        "systems": args.systems or list(SYSTEM_ORDER),
        "dtype": "float32 (CPU)"
        if (args.device or ("cpu" if dry else "cuda")) == "cpu"
        else "bf16 autocast over fp32 master weights",
        "budget_s": args.budget if args.budget is not None else (150.0 if dry else 450.0),
        "lr": 1e-6,
        "beta": compare.BETA,
        "loss": "sigmoid",
        "seed": compare.SEED,
        "optimizer": "AdamW fused (preftune: torch fused; TRL: adamw_torch_fused)",
        "gradient_checkpointing": False,
    }


def fill_batch(total_bytes: int, meta: dict, max_length: int) -> dict:
    """Pairs per step so that TRL's padded rows (2 x max_length per pair) fill ``FILL`` of the GPU."""
    cfg = meta["config"]
    per_token = ACT_BYTES_PER_TOKEN_LAYER_HIDDEN * cfg["hidden_size"] * cfg["num_hidden_layers"]
    per_pair = 2 * max_length * per_token
    static = STATIC_BYTES_PER_PARAM * meta["params_total"]
    free = FILL * total_bytes - static
    batch = max(1, min(MAX_BATCH, int(free // per_pair)))
    return {
        "batch": batch,
        "estimate": {
            "static_gib": static / GIB,
            "per_pair_gib_trl": per_pair / GIB,
            "fill": FILL,
            "total_gib": total_bytes / GIB,
        },
    }


def peak_bf16(device_name: str | None, probe_tflops: float | None) -> tuple[float | None, str]:
    for key, tflops in BF16_PEAK_TFLOPS:
        if device_name and key in device_name:
            return tflops * 1e12, f"datasheet ({key}, dense bf16)"
    if probe_tflops:
        return probe_tflops * 1e12, "measured matmul probe (device not in the datasheet table)"
    return None, "unknown"


# ---------------------------------------------------------------------------------------------------
# Output


class Report:
    """The JSON document and its markdown, rewritten after every stage and run (an interrupted check keeps
    what it measured)."""

    def __init__(self, out_dir: Path, doc: dict):
        self.out_dir = out_dir
        self.doc = doc
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = out_dir / "gpu_check.log"

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{self.doc_elapsed():5.0f}s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def doc_elapsed(self) -> float:
        return time.monotonic() - self.doc["_t0"]

    def write(self) -> None:
        doc = {k: v for k, v in self.doc.items() if not k.startswith("_")}
        doc["total_s"] = round(self.doc_elapsed(), 1)
        for name, text in (
            ("gpu_check.json", json.dumps(doc, indent=1, default=str)),
            ("gpu_check.md", markdown(doc)),
        ):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.out_dir / name)


def _f(x: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x * scale, spec)


def _fs(s: dict | None, spec: str = ".2f", scale: float = 1.0) -> str:
    """median [min–max] of a compare._stats dict."""
    if not s:
        return "–"
    med = format(s["median"] * scale, spec)
    if s["n"] == 1:
        return med
    return f"{med} [{format(s['min'] * scale, spec)}–{format(s['max'] * scale, spec)}]"


def markdown(doc: dict) -> str:
    dev = doc.get("device") or {}
    st = doc.get("settings") or {}
    lines = [
        f"## GPU check ({doc.get('mode')}): {dev.get('name') or 'device not reached'}",
        "",
        f"{doc.get('started')}; {doc.get('total_s', 0):.0f} s of a {st.get('budget_s', 0):.0f} s budget; "
        f"{'complete' if doc.get('complete') else 'INCOMPLETE: ' + str(doc.get('stopped') or 'interrupted')}. "
        f"torch {dev.get('torch')}, transformers {dev.get('transformers')}, trl {dev.get('trl')}, "
        f"liger-kernel {dev.get('liger_kernel')}; git {doc.get('environment', {}).get('git')}.",
        "",
        "| stage | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, s in (doc.get("stages") or {}).items():
        lines.append(
            f"| {name} | {s.get('status')} | {_f(s.get('seconds'), '.0f')} | {s.get('note', '')} |"
        )
    p = (doc.get("stages") or {}).get("pytest") or {}
    if p.get("counts"):
        lines += ["", f"**pytest -m gpu**: {p.get('note')}."]
        for fail in p.get("failures", [])[:12]:
            text = fail["message"][:300].replace("\n", " ")
            lines.append(f"- `{fail['test']}`: {text}")
    rows = doc.get("rows") or []
    if rows:
        mem_kind = "peak CUDA GiB" if st.get("device") == "cuda" else "peak RSS GiB (CPU)"
        peak = doc.get("peak") or {}
        lines += [
            "",
            f"### Per system ({st.get('model')} shape, {st.get('dtype')}, max_length "
            f"{st.get('max_length')}; {st.get('warmup')} warm-up + {st.get('steps')} timed steps per run; "
            f"tokens from the data, each prompt once)",
            "",
            f"MFU = model FLOP/s ÷ {_f((peak.get('flops') or 0) / 1e12, '.4g')} TFLOP/s "
            f"({peak.get('source')}); model FLOPs = (6 + 2 for the live reference) × N × tokens, "
            "attention not counted; 'incl. attention' adds the causal attention FLOPs of the useful tokens.",
            "",
            f"| row | system | pairs/step | runs | s/step | tokens/s | {mem_kind} | model TFLOP/s | MFU | "
            "MFU incl. attention | % of matmul probe | loss step 1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            systems = (row.get("summary") or {}).get("systems") or {}
            for system in row["systems"]:
                s = systems.get(system)
                if not s:
                    why = row.get("why_missing", {}).get(system, "not run or failed (see JSON)")
                    cells = [row["name"], system, str(row["batch"]), "0", why] + [""] * 7
                    lines.append("| " + " | ".join(cells) + " |")
                    continue
                lines.append(
                    f"| {row['name']} | {system} | {row['batch']} | {s['runs']} | "
                    f"{_fs(s['step_s'], '.3f')} | {_fs(s['tokens_per_s'], '.0f')} | "
                    f"{_f(s['peak_mem_gib'])} | {_fs(s['model_tflops'], '.1f')} | "
                    f"{_fs(s['mfu'], '.1f', 100)}% | {_fs(s['mfu_with_attention'], '.1f', 100)}% | "
                    f"{_fs(s['share_of_probe'], '.0f', 100)}% | {_f(s.get('loss_step1'), '.6f')} |"
                )
        lines += [
            "",
            "### preftune ÷ TRL (neighbouring runs, median [min–max])",
            "",
            "| row | vs | tokens/s ratio | peak memory ratio |",
            "|---|---|---|---|",
        ]
        for row in rows:
            for other, r in ((row.get("summary") or {}).get("ratios") or {}).items():
                lines.append(
                    f"| {row['name']} | {other} | {_fs(r.get('tokens_per_s'))} | "
                    f"{_fs(r.get('peak_mem'))} |"
                )
    targets = doc.get("targets") or []
    if targets:
        lines += ["", "### Targets (issue 17)", "", "| target | value | verdict |", "|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {_f(t.get('value'), '.3f')} | {t['verdict']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Child processes (parent side)


class Budget:
    """Seconds left before the deadline, less a reserve for writing the files."""

    def __init__(self, seconds: float, reserve: float = 8.0, clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + seconds
        self.reserve = reserve

    def left(self) -> float:
        return self.deadline - self.clock() - self.reserve

    def cap(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.left()))


_CURRENT: list[subprocess.Popen] = []  # the child running now (killed with the driver)


def _kill_current() -> None:
    for proc in _CURRENT:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_child(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group; on timeout kill the whole group."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"\n===== {' '.join(cmd)} (timeout {timeout:.0f}s)\n".encode())
        f.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env or child_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _CURRENT.append(proc)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_current()
            rc = proc.wait()
        finally:
            _CURRENT.remove(proc)
    return {"rc": rc, "timed_out": timed_out, "wall_s": time.monotonic() - t0}


def child_env() -> dict:
    env = bench_env()
    src = str(REPO / "src")
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        env["PYTHONPATH"] = os.pathsep.join([src, *parts])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_cmd(kind: str, spec_path: Path, out_path: Path | None = None) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--spec",
        str(spec_path),
    ]
    return cmd + (["--out", str(out_path)] if out_path else [])


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------
# Stages


def stage_install(rep: Report, wheels: Path, budget: Budget) -> dict:
    """pip's resolver against what is installed, taking only what is missing from the wheel folder; on a
    version conflict, the missing distributions alone with --no-deps (recorded)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return {"status": "skipped", "note": f"no wheels in {wheels}"}
    result: dict[str, Any] = {"status": "ok", "wheels": [w.name for w in found], "groups": {}}
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    pip += ["--disable-pip-version-check", "--no-cache-dir", "-q"]
    log = rep.out_dir / "children.log"
    names = {_dist_name(w.name): w for w in found}
    groups = [["datasets", "trl"], ["liger_kernel"]]  # Liger may fail alone
    for group in groups:
        present = [n for n in group if n in names]
        if not present:
            continue
        key = "+".join(present)
        reqs = [_requirement(names[n].name) for n in present]
        r = run_child(pip + reqs, log, budget.cap(90), env=dict(os.environ))
        entry = {"resolver": r}
        if r["rc"] != 0:
            importlib.invalidate_caches()
            missing = [
                w for n, w in names.items() if not _installed(n) and n not in ("fsspec",)
            ]  # fsspec is there; only its version may be off
            if missing:
                r2 = run_child(
                    [*pip, "--no-deps", *map(str, missing)],
                    log,
                    budget.cap(60),
                    env=dict(os.environ),
                )
                entry["no_deps"] = {**r2, "wheels": [w.name for w in missing]}
                entry["status"] = (
                    "installed without dependency check" if r2["rc"] == 0 else "failed"
                )
            else:
                entry["status"] = "failed"
        else:
            entry["status"] = "ok"
        result["groups"][key] = entry
        rep.log(f"install {key}: {entry['status']}")
    importlib.invalidate_caches()
    result["importable"] = {n: _installed(n) for n in ("datasets", "trl", "liger_kernel")}
    if not all(result["importable"][n] for n in ("datasets", "trl")):
        result["status"] = "partial"
    result["note"] = ", ".join(f"{k}: {v}" for k, v in result["importable"].items())
    return result


def _dist_name(wheel: str) -> str:
    return wheel.split("-")[0].lower().replace("-", "_")


def _requirement(wheel: str) -> str:
    name, version = wheel.split("-")[:2]
    return f"{name}=={version}"


def _installed(module_or_dist: str) -> bool:
    try:
        return importlib.util.find_spec(module_or_dist) is not None
    except (ImportError, ValueError):
        return False


def stage_pytest(rep: Report, settings: dict, work: Path, budget: Budget, cap: float) -> dict:
    xml = work / "pytest.xml"
    target = "tests/test_gpu.py" if settings["mode"] == "dry-run" else "tests"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={xml}", target]
    log = rep.out_dir / "pytest.txt"
    r = run_child(cmd, log, budget.cap(cap))
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), **r}
    out.update(_junit(xml))
    c = out.get("counts") or {}
    if r["timed_out"]:
        out["status"] = "timeout"
    elif r["rc"] == 5:
        out["status"] = "no tests"
    elif c and c["failed"] == c["errors"] == 0 and r["rc"] in (0, 1):
        out["status"] = "passed"  # rc 1 with collection errors only: see the note
    else:
        out["status"] = "FAILED"
    out["note"] = (
        f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        + (f", {c['collection_errors']} modules not collected" if c["collection_errors"] else "")
        if c
        else _tail(log, 3).replace("\n", " / ")[:200]
    )
    return out


def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "collection_errors": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kids = {child.tag: child for child in case}
        if "failure" in kids or "error" in kids:
            tag = "failure" if "failure" in kids else "error"
            message = kids[tag].get("message") or ""
            if tag == "error" and message == "collection failure":
                # a module that does not import here (an optional package): its gpu tests, if any,
                # did not run; the others did
                counts["collection_errors"] += 1
                message = (kids[tag].text or "").strip().splitlines()[-1:]
                message = message[0] if message else "collection failure"
            else:
                counts["failed" if tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": message[:2000]})
        elif "skipped" in kids:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failures": failures}


def stage_prepare(rep: Report, settings: dict, work: Path, budget: Budget, cap: float) -> dict:
    spec = {
        "out_dir": str(work / "model"),
        "model": settings["model"],
        "seed": 0,
        "device": settings["device"],
        "facts_out": str(work / "device.json"),
    }
    spec_path = work / "prepare.json"
    spec_path.write_text(json.dumps(spec))
    r = run_child(worker_cmd("prepare", spec_path), rep.out_dir / "children.log", budget.cap(cap))
    out: dict[str, Any] = dict(r)
    meta_path = work / "model" / "bench_meta.json"
    if r["rc"] == 0 and meta_path.exists() and Path(spec["facts_out"]).exists():
        out["status"] = "ok"
        out["meta"] = json.loads(meta_path.read_text())
        out["device"] = json.loads(Path(spec["facts_out"]).read_text())
        out["model_dir"] = str(work / "model")
        out["note"] = f"{out['meta']['params_total'] / 1e6:.0f}M params"
    else:
        out["status"] = "timeout" if r["timed_out"] else "FAILED"
        out["note"] = _tail(rep.out_dir / "children.log", 5).replace("\n", " / ")[:300]
    return out


def _available_systems(settings: dict) -> tuple[list[str], dict[str, str]]:
    have_trl = _installed("trl") and _installed("datasets")
    have_liger = _installed("liger_kernel")
    systems, why = [], {}
    for s in settings["systems"]:
        if s == "preftune":
            systems.append(s)
        elif s == "trl":
            if have_trl:
                systems.append(s)
            else:
                why[s] = "TRL not installed"
        elif s == "trl-liger":
            if not have_trl:
                why[s] = "TRL not installed"
            elif settings["device"] != "cuda":
                why[s] = "Liger kernels need CUDA (Triton)"
            elif not have_liger:
                why[s] = "liger-kernel not installed"
            else:
                systems.append(s)
    return systems, why


def stage_bench(rep: Report, settings: dict, prep: dict, work: Path, budget: Budget) -> dict:
    doc = rep.doc
    meta, device = prep["meta"], prep["device"]
    systems, why = _available_systems(settings)
    # keep the canonical order
    systems = [s for s in SYSTEM_ORDER if s in systems]
    if settings["batch"]:
        batch, estimate = settings["batch"], {"note": "--batch"}
    elif settings["device"] == "cuda":
        sized = fill_batch(device["total_memory"], meta, settings["max_length"])
        batch, estimate = sized["batch"], sized["estimate"]
    else:
        batch, estimate = 2, {"note": "dry run"}
    doc["settings"]["batch_estimate"] = estimate
    flops, source = peak_bf16(device.get("name"), device.get("probe_tflops"))
    if settings["device"] != "cuda":
        flops, source = (device.get("probe_tflops") or 0) * 1e12 or None, "CPU fp32 matmul probe"
    doc["peak"] = {"flops": flops, "source": source}

    rows = []
    for ds in settings["datasets"]:
        row = {
            "name": f"{settings['model']}/{ds}/{settings['max_length']}",
            "dataset": ds,
            "max_length": settings["max_length"],
            "batch": batch,
            "systems": list(systems) + [s for s in why if s in settings["systems"]],
            "why_missing": dict(why),
            "runs": [],
            "discarded_runs": [],
        }
        rows.append(row)
    doc["rows"] = rows
    for row in rows:
        _prepare_row_data(row, settings, meta, work)
    schedule = []
    for rnd in range(settings["rounds"]):
        order = systems if rnd % 2 == 0 else list(reversed(systems))
        for row in rows:
            schedule += [(row, s, rnd) for s in order]
    walls: dict[str, float] = {}
    default_wall = 75.0 if settings["device"] == "cuda" else 30.0
    failed: set[str] = set()  # a system that failed other than by memory is not run again
    counter = 0
    i = 0
    stopped = None
    while i < len(schedule):
        row, system, rnd = schedule[i]
        i += 1
        if system in failed:
            row.setdefault("skipped_after_failure", []).append(system)
            continue
        need = walls.get(system, default_wall)
        if budget.left() < need:
            stopped = f"time budget: {len(schedule) - i + 1} runs not started"
            for r2, s2, _ in schedule[i - 1 :]:
                r2.setdefault("not_run", []).append(s2)
            break
        counter += 1
        result = _one_run(rep, settings, row, system, counter, prep, work, budget)
        walls[system] = max(walls.get(system, 0.0), result["wall_s"] * 1.1)
        if "error" in result and result.get("oom") and row["batch"] > 1 and not row.get("halved"):
            # Every system of a row trains the same batch: start the row again at half the batch.
            row["discarded_runs"] += row["runs"] + [result]
            row["runs"] = []
            row["batch"] = max(1, row["batch"] // 2)
            row["halved"] = True
            _prepare_row_data(row, settings, meta, work)
            done = [(r, s, k) for r, s, k in schedule[:i] if r is row]
            schedule[i:i] = done  # redo this row's runs so far, right away
            rep.log(f"{row['name']}: out of memory; row restarted at batch {row['batch']}")
        else:
            row["runs"].append(result)
            if "error" in result and not result.get("oom"):
                failed.add(system)
        row["summary"] = summarize_row(row, settings, meta, doc["peak"]["flops"])
        doc["targets"] = targets(doc)
        rep.write()
    return {
        "status": "ok" if stopped is None else "partial",
        "note": stopped or f"{counter} runs",
        "systems": systems,
        "skipped_systems": why,
    }


def _prepare_row_data(row: dict, settings: dict, meta: dict, work: Path) -> None:
    n_pairs = row["batch"] * (settings["warmup"] + settings["steps"])
    path = work / "data" / f"{row['dataset']}-{row['max_length']}-{n_pairs}.jsonl"
    if not path.exists():
        pairs = make_pairs(
            row["dataset"],
            n_pairs,
            max_length=row["max_length"],
            vocab_size=meta["config"]["vocab_size"],
            seed=settings["seed"],
        )
        write_jsonl(path, pairs)
    row["data_file"] = str(path)


def _one_run(
    rep: Report,
    settings: dict,
    row: dict,
    system: str,
    counter: int,
    prep: dict,
    work: Path,
    budget: Budget,
) -> dict:
    tag = f"{counter:02d}-{system}-{row['dataset']}"
    run_dir = work / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    device = settings["device"]
    spec = {
        "model_dir": prep["model_dir"],
        "ref_model_dir": None,
        "data_file": row["data_file"],
        "max_length": row["max_length"],
        "mode": "default",
        "warmup": settings["warmup"],
        "steps": settings["steps"],
        "batch": row["batch"],
        "lr": settings["lr"],
        "seed": settings["seed"],
        "work": str(run_dir),
        "preftune_set": ["train.device=cuda", "model.dtype=bfloat16"] if device == "cuda" else [],
        "device": device,
        "liger": system == "trl-liger",
    }
    spec_path, out_path = run_dir / "spec.json", run_dir / "result.json"
    spec_path.write_text(json.dumps(spec))
    kind = "preftune" if system == "preftune" else "trl"
    log = work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cap = 240.0 if device == "cuda" else 90.0
    r = run_child(worker_cmd(kind, spec_path, out_path), log, budget.cap(cap))
    _append(rep.out_dir / "children.log", log)
    if r["rc"] == 0 and out_path.exists():
        result = json.loads(out_path.read_text())
    else:
        tail = _tail(log)
        result = {
            "error": "timeout" if r["timed_out"] else f"exit code {r['rc']}",
            "log_tail": tail,
            "oom": bool(re.search(r"out of memory|OutOfMemoryError", tail, re.IGNORECASE)),
        }
    result.update(system=system, wall_s=r["wall_s"], batch=row["batch"], round_tag=tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    if "error" in result:
        rep.log(f"{row['name']} {system}: {result['error']} ({r['wall_s']:.0f}s)")
    else:
        s = summarize_run(result, settings, row, prep["meta"], rep.doc["peak"]["flops"])
        result["summary"] = s
        if "error" in s:
            rep.log(f"{row['name']} {system}: {s['error']}")
        else:
            rep.log(
                f"{row['name']} {system}: {s['step_s']['median']:.3f} s/step, "
                f"{s['tokens_per_s']:.0f} tok/s, peak {_f(s['peak_mem_gib'])} GiB, "
                f"MFU {_f(s['mfu'], '.1f', 100)}% ({r['wall_s']:.0f}s)"
            )
    return result


def _append(dest: Path, src: Path, limit: int = 4 * 1024**2) -> None:
    try:
        data = src.read_bytes()
    except OSError:
        return
    with contextlib.suppress(OSError):
        if dest.exists() and dest.stat().st_size > limit:
            return
        with open(dest, "ab") as f:
            f.write(f"\n===== {src.name}\n".encode() + data[-512 * 1024 :])


# ---------------------------------------------------------------------------------------------------
# Summaries (compare.summarize_run, plus CUDA memory, MFU and attention FLOPs)


def attention_flops(data_rows: list[dict], step_pairs: list[list[int]], meta: dict, live_ref: bool):
    """Causal attention FLOPs of the useful tokens (each prompt once): per layer, 4·d FLOPs per attended
    (query, key) pair in a forward (QKᵀ and AV); training = 3 forwards' worth, plus the reference's."""
    cfg = meta["config"]
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    pairs = 0
    for step in step_pairs:
        for i in step:
            p, c, r = pair_token_counts(data_rows[i])
            pairs += p * (p + 1) // 2 + c * p + c * (c + 1) // 2 + r * p + r * (r + 1) // 2
    return (3 + (1 if live_ref else 0)) * layers * 4 * d * pairs


def summarize_run(
    result: dict, settings: dict, row: dict, meta: dict, peak_flops: float | None
) -> dict:
    crow = compare.Row(
        meta["name"],
        row["dataset"],
        row["max_length"],
        "default",
        warmup=settings["warmup"],
        steps=settings["steps"],
    )
    data_rows = read_jsonl(Path(row["data_file"]))
    s = compare.summarize_run(result, crow, data_rows, meta)
    if "error" in s:
        return s
    w, n = settings["warmup"], settings["steps"]
    live_ref = result.get("reference") != "precomputed"
    attn = attention_flops(data_rows, result["step_pairs"][w : w + n], meta, live_ref)
    seconds = sum(s["step_s_all"])
    model_flops_s = s["model_gflops"] * 1e9
    s["model_tflops"] = model_flops_s / 1e12
    s["attention_tflops"] = attn / seconds / 1e12 if seconds else None
    s["mfu"] = model_flops_s / peak_flops if peak_flops else None
    s["mfu_with_attention"] = (
        (model_flops_s + attn / seconds) / peak_flops if peak_flops and seconds else None
    )
    s["share_of_probe"] = s.get("share_of_matmul_peak")
    alloc = result.get("peak_cuda_alloc_bytes")
    s["peak_mem_gib"] = alloc / GIB if alloc else s.get("peak_rss_gib")
    s["peak_mem_kind"] = "cuda_max_memory_allocated" if alloc else "host_peak_rss"
    reserved = result.get("peak_cuda_reserved_bytes")
    s["peak_cuda_reserved_gib"] = reserved / GIB if reserved else None
    losses = result.get("losses") or []
    s["loss_step1"] = losses[0] if losses else None
    return s


def summarize_row(row: dict, settings: dict, meta: dict, peak_flops: float | None) -> dict:
    stats = compare._stats
    ok = [r for r in row["runs"] if "error" not in r and "error" not in r.get("summary", {})]
    out: dict[str, Any] = {"systems": {}, "ratios": {}}
    for system in row["systems"]:
        runs = [r["summary"] for r in ok if r["system"] == system]
        if not runs:
            continue
        mems = [r["peak_mem_gib"] for r in runs if r["peak_mem_gib"] is not None]
        out["systems"][system] = {
            "runs": len(runs),
            "step_s": stats([x for r in runs for x in r["step_s_all"]]),
            "tokens_per_s": stats([r["tokens_per_s"] for r in runs]),
            "peak_mem_gib": max(mems) if mems else None,
            "model_tflops": stats([r["model_tflops"] for r in runs]),
            "mfu": stats([r["mfu"] for r in runs if r["mfu"] is not None]),
            "mfu_with_attention": stats(
                [r["mfu_with_attention"] for r in runs if r["mfu_with_attention"] is not None]
            ),
            "share_of_probe": stats(
                [r["share_of_probe"] for r in runs if r["share_of_probe"] is not None]
            ),
            "loss_step1": runs[0]["loss_step1"],
            "reference": runs[0].get("reference"),
            "tokens_match_data": all(r.get("tokens_match_data") for r in runs),
        }
    # Ratios between neighbouring runs of preftune and one other system (the others left out).
    for other in row["systems"]:
        if other == "preftune":
            continue
        seq = [r for r in ok if r["system"] in ("preftune", other)]
        ratios = compare_report.neighbour_ratios(seq, ("tokens_per_s", "peak_mem_gib"))
        if ratios["tokens_per_s"]:
            out["ratios"][other] = {
                "tokens_per_s": stats(ratios["tokens_per_s"]),
                "peak_mem": stats(ratios["peak_mem_gib"]),
            }
    return out


def targets(doc: dict) -> list[dict]:
    dry = doc.get("mode") != "gpu"
    out = []

    def add(target: str, value: float | None, ok: bool | None) -> None:
        if dry:
            verdict = "n/a (dry run)"
        elif value is None:
            verdict = "not measured"
        else:
            verdict = "met" if ok else "MISSED"
        out.append({"target": target, "value": value, "verdict": verdict})

    for row in doc.get("rows") or []:
        summ = row.get("summary") or {}
        trl = (summ.get("ratios") or {}).get("trl") or {}
        ds = row["dataset"]
        if ds in SPEED_TARGETS:
            v = (trl.get("tokens_per_s") or {}).get("median")
            bound = SPEED_TARGETS[ds]
            add(f"{row['name']}: tokens/s ≥ {bound}× TRL", v, v is not None and v >= bound)
        v = (trl.get("peak_mem") or {}).get("median")
        add(
            f"{row['name']}: peak memory ≤ {MEMORY_TARGET}× TRL",
            v,
            v is not None and v <= MEMORY_TARGET,
        )
        p = (summ.get("systems") or {}).get("preftune") or {}
        v = (p.get("mfu") or {}).get("median")
        add(f"{row['name']}: preftune MFU ≥ {MFU_TARGET:.0%}", v, v is not None and v >= MFU_TARGET)
    return out


# ---------------------------------------------------------------------------------------------------
# Workers (child side)


def probe_tflops(device: str) -> float:
    """Median matmul rate in TFLOP/s: bf16 8192³ on CUDA (random data, CUDA events, 3 warm-ups, 10 timed),
    fp32 256³ on CPU (the dry run only needs a number)."""
    import torch

    if device == "cuda":
        n, reps = 8192, 10
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.mm(a, b)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del a, b
        torch.cuda.empty_cache()
        return 2 * n**3 / statistics.median(times) / 1e12
    n, reps = 256, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def worker_prepare(spec: dict) -> None:
    import torch
    import transformers
    from _common import build_model_folder

    device = spec["device"]
    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("trl", "datasets", "liger_kernel", "accelerate", "peft", "triton"):
        facts[mod] = _version(mod)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(
            name=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            total_memory=props.total_memory,
            multiprocessors=props.multi_processor_count,
        )
        facts["probe_tflops"] = probe_tflops("cuda")
    else:
        facts.update(name=f"CPU ({platform.machine()})", total_memory=None)
        facts["probe_tflops"] = probe_tflops("cpu")
    facts["probe"] = "bf16 8192³ torch.mm" if device == "cuda" else "fp32 256³ torch.mm (CPU)"
    t0 = time.perf_counter()
    build_model_folder(Path(spec["out_dir"]), spec["model"], seed=spec["seed"])
    facts["model_build_s"] = time.perf_counter() - t0
    Path(spec["facts_out"]).write_text(json.dumps(facts, indent=1))


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"liger_kernel": "liger-kernel"}.get(module, module)
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cuda_shims(spec: dict) -> None:
    """Harness-only changes to compare.py's workers for this process: device-aware matmul probe, a
    Recorder that synchronizes the device at each step end and reads CUDA peak memory, no final
    checkpoint write (preftune), TRL's DPOConfig on the GPU in bf16 (and Liger's layer kernels)."""
    import _common
    import torch

    device = spec["device"]
    cuda = device == "cuda"
    probe = functools.partial(probe_tflops, device)
    _common.matmul_gflops = lambda: probe() * 1e3  # GFLOP/s, as compare.summarize_run expects

    base = compare_workers.Recorder

    class DeviceRecorder(base):
        peak_alloc: int | None = None
        peak_reserved: int | None = None

        def step_end(self) -> None:
            if cuda:
                torch.cuda.synchronize()  # a step ends when its kernels have run
            super().step_end()
            if cuda and len(self.step_end_times) == self.total:
                self.peak_alloc = torch.cuda.max_memory_allocated()
                self.peak_reserved = torch.cuda.max_memory_reserved()

        def batch(self, input_ids, attention_mask, completion_mask, index=None) -> None:
            # one copy per tensor instead of a device sync per row
            super().batch(input_ids.cpu(), attention_mask.cpu(), completion_mask.cpu(), index)

        def dump(self, path, **extra) -> None:
            extra.update(
                peak_cuda_alloc_bytes=self.peak_alloc,
                peak_cuda_reserved_bytes=self.peak_reserved,
                device=device,
            )
            super().dump(path, **extra)

    compare_workers.Recorder = DeviceRecorder  # the workers' module looks it up at call time
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def worker_preftune(spec: dict, out: Path) -> None:
    import logging

    # preftune's own lines (the layout it chose and why, the reference) go to the child's log
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _cuda_shims(spec)
    if spec["device"] == "cuda":
        import preftune.trainer as ptrainer

        ptrainer._save = lambda *a, **k: (
            None
        )  # the final checkpoint: after the timed steps, minutes of I/O
    compare.worker_preftune(spec, out)


def worker_trl(spec: dict, out: Path) -> None:
    _cuda_shims(spec)
    import trl

    config_cls = trl.DPOConfig
    device, liger = spec["device"], spec["liger"]

    def dpo_config(**kwargs):
        if device == "cuda":
            kwargs.update(use_cpu=False, bf16=True, fp16=False)
        if liger:
            kwargs["use_liger_kernel"] = True
        return config_cls(**kwargs)

    trl.DPOConfig = dpo_config  # compare.worker_trl does `from trl import DPOConfig` at call time
    compare.worker_trl(spec, out)


# ---------------------------------------------------------------------------------------------------
# Parent


def environment() -> dict:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        env["git"] = git.stdout.strip() or None
    except OSError:
        env["git"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny model, 1 timed step per system"
    )
    ap.add_argument("--out", help="output folder (default $OUT, else ./gpu-check-out)")
    ap.add_argument("--wheels", default=str(BENCH / ".wheels"), help="wheel folder to install from")
    ap.add_argument(
        "--budget", type=float, help="seconds for everything (default 450; dry run 150)"
    )
    ap.add_argument("--batch", type=int, help="pairs per step (default: sized to fill the GPU)")
    ap.add_argument(
        "--rounds", type=int, help="rounds of the systems per row (default 2; dry run 1)"
    )
    ap.add_argument("--steps", type=int, help="timed steps per run (default 6; dry run 1)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per run, >= 1 (default 2; dry run 1)")
    ap.add_argument("--max-length", type=int, help="tokens (default 2048; dry run 256)")
    ap.add_argument("--model", choices=sorted(MODELS), help="model shape (default llama1b / tiny)")
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="default cuda; dry run cpu (cpu: to test the check)",
    )
    ap.add_argument("--datasets", nargs="+", choices=["prompt-heavy", "response-heavy", "mixed"])
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEM_ORDER))
    ap.add_argument("--skip-install", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--pytest-timeout", type=float, default=150.0, help="seconds (default 150)")
    ap.add_argument("--workdir", help="models, data, logs (default: a temp folder, deleted)")
    ap.add_argument("--worker", choices=("prepare", "preftune", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        out = Path(args.out) if args.out else None
        if args.worker == "prepare":
            worker_prepare(spec)
        elif args.worker == "preftune":
            worker_preftune(spec, out)
        else:
            worker_trl(spec, out)
        return 0
    if args.warmup is not None and args.warmup < 1:
        ap.error("--warmup must be >= 1 (a timed step is measured from the end of the one before)")

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    settings = plan_settings(args)
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "gpu-check-out")
    for name in ("gpu_check.json", "gpu_check.md", "gpu_check.log", "pytest.txt", "children.log"):
        (out_dir / name).unlink(missing_ok=True)
    doc: dict[str, Any] = {
        "_t0": time.monotonic(),
        "schema": SCHEMA,
        "tool": "bench/gpu_check.py",
        "mode": settings["mode"],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
        "stopped": None,
        "environment": environment(),
        "settings": settings,
        "device": None,
        "peak": None,
        "stages": {},
        "rows": [],
        "targets": [],
    }
    rep = Report(out_dir, doc)
    budget = Budget(settings["budget_s"])
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):
        _kill_current()
        doc["stopped"] = f"signal {signal.Signals(signum).name}"
        rep.log(f"stopped by {doc['stopped']}; writing what was measured")
        rep.write()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    rep.log(f"GPU check ({settings['mode']}): budget {settings['budget_s']:.0f}s, out {out_dir}")
    rep.write()
    try:
        _stages(rep, args, settings, work, budget)
        doc["complete"] = doc["stopped"] is None
    except Exception as e:  # the files still say what was measured
        doc["stopped"] = f"driver error: {type(e).__name__}: {e}"
        rep.log(doc["stopped"])
    finally:
        rep.write()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rep.log(f"done in {rep.doc_elapsed():.0f}s: {out_dir / 'gpu_check.md'}")
    print()
    print((out_dir / "gpu_check.md").read_text())
    return 0 if doc["complete"] else 1


def _stages(rep: Report, args, settings: dict, work: Path, budget: Budget) -> None:
    doc = rep.doc
    stages = doc["stages"]

    def timed(name: str, fn) -> dict:
        t0 = time.monotonic()
        rep.log(f"stage {name} ...")
        try:
            res = fn()
        except Exception as e:
            res = {"status": "FAILED", "note": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.monotonic() - t0, 1)
        stages[name] = res
        rep.log(f"stage {name}: {res.get('status')} ({res['seconds']:.0f}s) {res.get('note', '')}")
        rep.write()
        return res

    if settings["mode"] == "dry-run" or args.skip_install:
        stages["install"] = {"status": "skipped", "note": "dry run installs nothing"}
        if args.skip_install:
            stages["install"]["note"] = "--skip-install"
    else:
        timed("install", lambda: stage_install(rep, Path(args.wheels), budget))
    if args.skip_tests:
        stages["pytest"] = {"status": "skipped", "note": "--skip-tests"}
    else:
        timed("pytest", lambda: stage_pytest(rep, settings, work, budget, args.pytest_timeout))
    if args.skip_bench:
        stages["prepare"] = stages["bench"] = {"status": "skipped", "note": "--skip-bench"}
        return
    prep = timed("prepare", lambda: stage_prepare(rep, settings, work, budget, 150.0))
    if prep.get("status") != "ok":
        doc["stopped"] = "prepare stage failed"
        return
    doc["device"] = prep["device"]
    res = timed("bench", lambda: stage_bench(rep, settings, prep, work, budget))
    if res.get("status") != "ok":
        doc["stopped"] = res.get("note")


if __name__ == "__main__":
    sys.exit(main())
