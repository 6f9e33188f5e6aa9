#!/usr/bin/env python
"""Check preftune's memory plan (``preftune.plan``) against measured peak RSS on this CPU.

    python bench/plan_check.py                       # the default rows, 2 runs each; a markdown table
    python bench/plan_check.py --rows 'smol135m/prompt-heavy/512/.*' --runs 3
    python bench/plan_check.py --list                # the rows and exit
    python bench/plan_check.py --from bench/results/plan-check-X.json   # re-estimate saved measurements

Method. Each run is a fresh interpreter (``--worker``) that trains ``--steps`` optimizer steps with
``preftune.trainer.train`` on a random-init Llama of ``bench/_common.py``'s shapes (SmolLM-135M's included,
fp32 safetensors built once by ``_common.build_model_folder``) and synthetic pairs of ``_common.make_pairs``
(2 pairs per step, one epoch, every pair fits max_length), the settings of ``compare.py``'s preftune worker.
The worker records ``VmHWM`` (peak resident set since exec) at the end of every optimizer step (the
scheduler's step, the last thing of a step) and ``VmRSS`` right before the policy model loads (after the
data is tokenized: where the trainer prints the plan; the plan's framework baseline). The measured peak
is VmHWM at the end of the last step (before the final checkpoint is written). The parent (which never
trains) computes the plan for the same config and data, with the baseline the child measured, and prints
estimate vs measured (min / median / max over the runs). ``--from`` recomputes the estimates for saved
measurements; with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment of both the measuring run and
``--from`` (every large tensor mapped and unmapped, so peak RSS = peak live bytes) it checks the plan's
live bytes alone, without the allocator-retention line. Runs go one at a time; ``OMP_WAIT_POLICY=PASSIVE``; the machine's load average is recorded
per run (other processes do not change a process's own RSS, only its speed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MODELS, bench_env, make_pairs, vm_kib, write_jsonl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GIB = 1024**3
BATCH = 2
SEED = 42
TOLERANCE = 0.25

#: mode -> config overrides (on top of compare.py's preftune worker settings)
MODES: dict[str, list[str]] = {
    "default": [],  # reference auto = copy, prefix sharing auto = shared prompt (Llama)
    "padded": ["train.prefix_sharing=false"],
    "gc": ["model.gradient_checkpointing=true"],
    "precomputed": ["reference.strategy=precomputed"],
    "lora": ["model.lora.enabled=true", "optim.lr=1e-4"],
    "gc-padded": ["model.gradient_checkpointing=true", "train.prefix_sharing=false"],
}


@dataclass
class Row:
    model: str
    dataset: str
    max_length: int
    mode: str
    steps: int = 3

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}/{self.max_length}/{self.mode}"


ROWS = [
    Row("smol135m", "prompt-heavy", 512, "default"),
    Row("smol135m", "prompt-heavy", 1024, "default"),
    Row("smol135m", "prompt-heavy", 512, "padded"),
    Row("smol135m", "prompt-heavy", 1024, "gc"),
    Row("smol135m", "response-heavy", 1024, "default"),
    Row("smol135m", "prompt-heavy", 512, "precomputed"),
    Row("smol135m", "prompt-heavy", 512, "lora"),
    Row("smol135m", "prompt-heavy", 2048, "gc"),
    Row("smol135m", "response-heavy", 1024, "padded"),
    Row("smol135m", "prompt-heavy", 1024, "lora"),
    Row("20m", "prompt-heavy", 1024, "default"),
    Row("20m", "response-heavy", 1024, "padded"),
]


# ---------------------------------------------------------------------------------------------------
# The config of a row (parent and child build the same one)


def row_config(row: Row, model_dir: Path, data_file: Path, work: Path):
    from preftune.config import apply_overrides, config_from_dict, validate

    cfg = config_from_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {
                "train_files": [str(data_file)],
                "max_length": row.max_length,
                "max_prompt_length": None,
                "cache_dir": str(work / "cache"),
            },
            "loss": {"name": ["sigmoid"], "beta": 0.1},
            "reference": {"batch_size": BATCH, "cache_dir": str(work / "cache")},
            "optim": {"lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0},
            "train": {
                "output_dir": str(work / "run"),
                "seed": SEED,
                "max_steps": row.steps,
                "batch_size": BATCH,
                "device": "cpu",
                "resume": "never",
                "save_final": False,
            },
            "log": {"log_every": 1, "progress": False, "tensorboard": False},
        }
    )
    apply_overrides(cfg, MODES[row.mode])
    validate(cfg)
    return cfg


def data_file(workdir: Path, row: Row) -> Path:
    path = workdir / "data" / f"{row.dataset}-{row.max_length}-{BATCH * row.steps}.jsonl"
    if not path.exists():
        vocab = MODELS[row.model]["vocab_size"]
        rows = make_pairs(
            row.dataset, BATCH * row.steps, max_length=row.max_length, vocab_size=vocab, seed=SEED
        )
        write_jsonl(path, rows)
    return path


def model_dir(workdir: Path, name: str) -> Path:
    path = workdir / "models" / name
    if not (path / "bench_meta.json").exists():
        code = (
            "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; "
            f"from _common import build_model_folder; build_model_folder(Path({str(path)!r}), "
            f"{name!r}, seed=0)"
        )
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=bench_env(), check=True)
    return path


# ---------------------------------------------------------------------------------------------------
# Child: train and record peak RSS


def worker(spec: dict, out: Path) -> None:
    import preftune.build as pbuild
    import preftune.trainer as ptrainer

    row = Row(**spec["row"])
    work = Path(spec["work"])
    cfg = row_config(row, Path(spec["model_dir"]), Path(spec["data_file"]), work)
    record: dict = {"step_hwm_kib": [], "step_rss_kib": [], "load_start": os.getloadavg()}

    orig_policy = pbuild.build_policy_model

    def build_policy_model(
        *a, **k
    ):  # where the trainer would print the plan: data in, no model yet
        record.setdefault("rss_before_model_kib", vm_kib("VmRSS"))
        return orig_policy(*a, **k)

    pbuild.build_policy_model = build_policy_model
    orig_scheduler = pbuild.build_scheduler

    def build_scheduler(*a, **k):
        sched = orig_scheduler(*a, **k)
        base = type(sched)

        def step(self, *sa, **sk):
            result = base.step(self, *sa, **sk)
            record["step_hwm_kib"].append(vm_kib("VmHWM"))
            record["step_rss_kib"].append(vm_kib("VmRSS"))
            return result

        sched.__class__ = type(f"Recorded{base.__name__}", (base,), {"step": step})
        return sched

    pbuild.build_scheduler = build_scheduler
    t0 = time.perf_counter()
    ptrainer.train(cfg)
    record.update(
        wall_s=time.perf_counter() - t0,
        hwm_end_kib=vm_kib("VmHWM"),
        load_end=os.getloadavg(),
        peak_kib=record["step_hwm_kib"][-1],
    )
    out.write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------------------------------------------
# Parent


def run_once(row: Row, workdir: Path, k: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"run-{k}-", dir=workdir))
    spec = {
        "row": asdict(row),
        "model_dir": str(model_dir(workdir, row.model)),
        "data_file": str(data_file(workdir, row)),
        "work": str(work),
    }
    spec_path, out = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    log = work / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(spec_path), "--out", str(out)],
            cwd=REPO,
            env=bench_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        result = {"error": f"exit {proc.returncode}", "log_tail": tail}
    else:
        result = json.loads(out.read_text())
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return result


def estimate(row: Row, workdir: Path, baseline: int | None):
    """The plan of a row's config and data, with the baseline the child measured."""
    from preftune.plan import data_lengths, plan_memory

    work = workdir / "estimate"
    cfg = row_config(row, model_dir(workdir, row.model), data_file(workdir, row), work)
    return plan_memory(cfg, lengths=data_lengths(cfg), baseline=baseline, available=None)


def _stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def table(results: list[dict], workdir: Path) -> str:
    from preftune.plan import format_plan

    lines = [
        "| row | layout / reference | longest micro-batch | estimate GiB | measured GiB min / median / max"
        " | error (est / median − 1) | ±25% |",
        "|---|---|---|---|---|---|---|",
    ]
    details = []
    for res in results:
        row = Row(**{k: v for k, v in res["row"].items() if k != "name"})
        ok = [r for r in res["runs"] if "error" not in r]
        if not ok:
            lines.append(f"| {row.name} | FAILED: {res['runs'][0].get('error')} | | | | | |")
            continue
        peaks = [r["peak_kib"] * 1024 / GIB for r in ok]
        baseline = int(statistics.median(r["rss_before_model_kib"] for r in ok) * 1024)
        plan = estimate(row, workdir, baseline)
        est = plan.total / GIB
        lo, med, hi = _stats(peaks)
        err = est / med - 1
        lines.append(
            f"| {row.name} | {plan.layout} / {plan.reference} | {plan.batch.describe()} | {est:.2f} | "
            f"{lo:.2f} / {med:.2f} / {hi:.2f} ({len(ok)} runs) | {err:+.1%} | "
            f"{'yes' if abs(err) <= TOLERANCE else 'NO'} |"
        )
        details.append(f"#### {row.name}\n\n```\n{format_plan(plan)}\n```")
    return "\n".join(lines) + "\n\n" + "\n\n".join(details)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", help="only rows whose name (model/data/max_length/mode) matches")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per row (default 2)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 3)")
    ap.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "preftune-plan-check"),
        help="models and data (kept between invocations; default %(default)s)",
    )
    ap.add_argument(
        "--out", help="JSON of the measurements (default bench/results/plan-check-*.json)"
    )
    ap.add_argument("--from", dest="from_json", help="re-estimate the measurements of a saved JSON")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()), Path(args.out))
        return 0
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        results = [
            r for r in doc["rows"] if not args.rows or re.search(args.rows, r["row"]["name"])
        ]
        print(table(results, workdir))
        return 0
    rows = [r for r in ROWS if not args.rows or re.search(args.rows, r.name)]
    for r in rows:
        r.steps = args.steps or r.steps
    if args.list or not rows:
        for r in rows:
            print(f"{r.name}  steps={r.steps} runs={args.runs} overrides={MODES[r.mode]}")
        return 0 if rows else 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or RESULTS / f"plan-check-{time.strftime('%Y%m%d-%H%M%S')}.json")
    doc = {"machine": _machine(), "rows": []}
    for row in rows:
        entry = {"row": {**asdict(row), "name": row.name}, "runs": []}
        doc["rows"].append(entry)
        for k in range(args.runs):
            result = run_once(row, workdir, k)
            entry["runs"].append(result)
            msg = result.get("error") or (
                f"peak {result['peak_kib'] / 1024**2:.2f} GiB, before model "
                f"{result['rss_before_model_kib'] / 1024**2:.2f} GiB, {result['wall_s']:.0f} s, "
                f"load {result['load_start'][0]:.1f}"
            )
            print(f"- {row.name} run {k + 1}: {msg}", flush=True)
            out.write_text(json.dumps(doc, indent=1))
    print(f"\n{_machine_line(doc['machine'])}\n")
    print(table(doc["rows"], workdir))
    print(f"\nJSON: {out}")
    return 0


def _machine() -> dict:
    info = {"cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            (x.split(":", 1)[1].strip() for x in text.splitlines() if x.startswith("model name")),
            None,
        )
        mem = Path("/proc/meminfo").read_text().split()
        info["mem_total_gib"] = int(mem[mem.index("MemTotal:") + 1]) / 1024**2
    except (OSError, ValueError):
        pass
    import importlib.metadata as md

    for pkg in ("torch", "transformers"):
        info[pkg] = md.version(pkg)
    return info


def _machine_line(m: dict) -> str:
    return (
        f"machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('mem_total_gib', 0):.0f} GiB RAM; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}; {m.get('time')}"
    )


if __name__ == "__main__":
    sys.exit(main())
