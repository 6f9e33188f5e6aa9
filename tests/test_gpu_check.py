"""bench/gpu_check.sh --dry-run on CPU: the GPU check's machinery (stages, children, summaries, the JSON and
markdown it writes) runs end to end with a tiny model, so that the one prepared GPU check cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("PREFTUNE_GPU_TEST_DEVICE", None)
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_check.sh"),
            "--dry-run",
            "--workdir",
            str(tmp_path / "w"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} >= {"gpu_check.json", "gpu_check.md", "gpu_check.log"}
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back

    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["schema"] == 1 and doc["mode"] == "dry-run"
    assert doc["complete"] is True and doc["stopped"] is None
    assert doc["total_s"] < 60, f"the dry run took {doc['total_s']:.0f}s"
    stages = doc["stages"]
    assert stages["install"]["status"] == "skipped"  # a dry run installs nothing
    assert stages["prepare"]["status"] == "ok" and stages["bench"]["status"] == "ok"
    pytest_stage = stages["pytest"]
    assert pytest_stage["status"] == "passed", pytest_stage
    counts = pytest_stage["counts"]
    assert counts["failed"] == counts["errors"] == counts["collection_errors"] == 0
    assert counts["passed"] + counts["skipped"] >= 5

    assert doc["device"]["name"].startswith("CPU") and doc["peak"]["flops"] > 0
    (row,) = doc["rows"]
    assert row["dataset"] == "prompt-heavy" and row["batch"] >= 1
    systems = row["summary"]["systems"]
    p = systems["preftune"]
    assert p["runs"] == 1 and p["tokens_match_data"] is True
    assert p["tokens_per_s"]["median"] > 0 and p["step_s"]["median"] > 0
    assert 0 < p["mfu"]["median"] <= p["mfu_with_attention"]["median"]
    assert p["peak_mem_gib"] > 0
    assert math.isclose(p["loss_step1"], math.log(2), abs_tol=1e-6)  # policy = reference at θ₀
    have_trl = importlib.util.find_spec("trl") is not None
    assert ("trl" in systems) == have_trl
    if have_trl:
        assert math.isclose(systems["trl"]["loss_step1"], math.log(2), abs_tol=1e-6)
        assert row["summary"]["ratios"]["trl"]["tokens_per_s"]["median"] > 0
    else:
        assert row["why_missing"]["trl"] == "TRL not installed"
    assert {t["verdict"] for t in doc["targets"]} == {"n/a (dry run)"}

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## GPU check (dry-run)")
    for text in (
        "| stage | status |",
        "pytest -m gpu",
        "| row | system |",
        "### Targets (issue 17)",
    ):
        assert text in md
    assert "tiny/prompt-heavy/256 | preftune | 2 | 1 |" in md


# ----------------------------------------------------------------------------- the GPU run's planning
def _gpu_check():
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    return gpu_check


H200 = {"name": "NVIDIA H200", "total_memory": 143771 * 1024**2, "probe_tflops": 790.0}


def _plan(gc, **over):
    from types import SimpleNamespace

    args = dict(
        dry_run=False, model=None, max_length=None, datasets=None, batch=None, warmup=None,
        steps=None, rounds=None, systems=None, budget=None, device=None,
    )  # fmt: skip
    args.update(over)
    return gc.plan_settings(SimpleNamespace(**args))


def _meta(gc):
    return {"name": "llama1b", "params_total": 1_235_814_400, "config": gc.LLAMA_1B}


def test_gpu_plan_defaults_batch_and_peak():
    gc = _gpu_check()
    s = _plan(gc)
    assert (s["device"], s["model"], s["max_length"], s["budget_s"]) == (
        "cuda",
        "llama1b",
        2048,
        450,
    )
    assert s["datasets"] == ["prompt-heavy", "response-heavy"] and s["rounds"] == 2
    # TRL's two padded 2048-token rows per pair at ~10 GiB each, next to ~28 GiB of weights and states
    sized = gc.fill_batch(H200["total_memory"], _meta(gc), 2048)
    assert sized["batch"] == 8
    assert gc.peak_bf16("NVIDIA H200", 790.0)[0] == 989.4e12
    assert gc.peak_bf16("NVIDIA GH200 480GB", None)[0] == 989.4e12
    assert gc.peak_bf16("NVIDIA H100 PCIe", None)[0] == 756.5e12
    assert gc.peak_bf16("Some New GPU", 500.0) == (500.0e12, gc.peak_bf16("x", 500.0)[1])


def _fake_bench(gc, tmp_path, monkeypatch, budget_s, oom_on=None):
    import time

    settings = _plan(gc)
    doc = {"_t0": time.monotonic(), "mode": "gpu", "settings": settings, "stages": {}}
    rep = gc.Report(tmp_path / "out", doc)
    prep = {"meta": _meta(gc), "device": H200, "model_dir": str(tmp_path / "m")}
    calls = []
    clock = [0.0]  # the runs' wall time, as the budget sees it
    monkeypatch.setattr(gc, "_available_systems", lambda s: (list(gc.SYSTEM_ORDER), {}))

    def one_run(rep, settings, row, system, counter, prep, work, budget):
        calls.append((row["dataset"], system, row["batch"]))
        clock[0] += 30.0
        if oom_on == (row["dataset"], system) and len(calls) == 1:
            return {"error": "exit code 1", "oom": True, "system": system, "wall_s": 5.0}
        fast = system == "preftune"
        summary = {
            "step_s_all": [0.3 if fast else 0.7] * 6,
            "tokens_per_s": 50000.0 if fast else 20000.0,
            "peak_mem_gib": 60.0 if fast else 110.0,
            "model_tflops": 400.0,
            "mfu": 0.45,
            "mfu_with_attention": 0.48,
            "share_of_probe": 0.5,
            "loss_step1": 0.6931,
            "reference": "copy",
            "tokens_match_data": True,
        }
        return {"system": system, "wall_s": 30.0, "batch": row["batch"], "summary": summary}

    monkeypatch.setattr(gc, "_one_run", one_run)
    budget = gc.Budget(budget_s, reserve=0, clock=lambda: clock[0])
    res = gc.stage_bench(rep, settings, prep, tmp_path / "w", budget)
    return res, doc, calls


def test_gpu_schedule_interleaves_and_restarts_a_row_at_half_batch_on_oom(tmp_path, monkeypatch):
    gc = _gpu_check()
    res, doc, calls = _fake_bench(gc, tmp_path, monkeypatch, 1e6, oom_on=("prompt-heavy", "trl"))
    assert res["status"] == "ok"
    ph, rh = doc["rows"]
    assert ph["batch"] == 4 and rh["batch"] == 8  # only the row that ran out of memory is halved
    assert [r["system"] for r in ph["discarded_runs"]] == ["trl"]
    # round 1: trl, preftune, trl-liger; round 2 reversed: preftune neighbours both every time
    order = [s for d, s, _ in calls if d == "prompt-heavy"]
    assert order == ["trl", "trl", "preftune", "trl-liger", "trl-liger", "preftune", "trl"]
    assert {b for d, _, b in calls if d == "prompt-heavy"} == {8, 4}
    ratios = ph["summary"]["ratios"]
    assert ratios["trl"]["tokens_per_s"]["n"] == 2 and ratios["trl-liger"]["tokens_per_s"]["n"] == 2
    assert ratios["trl"]["tokens_per_s"]["median"] == 2.5
    verdicts = {t["target"]: t["verdict"] for t in doc["targets"]}
    assert verdicts["llama1b/prompt-heavy/2048: tokens/s ≥ 2.0× TRL"] == "met"
    assert verdicts["llama1b/prompt-heavy/2048: peak memory ≤ 0.5× TRL"] == "MISSED"
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"][0]["batch"] == 4


def test_gpu_schedule_stops_at_the_budget_and_says_what_did_not_run(tmp_path, monkeypatch):
    gc = _gpu_check()
    # 30 s a run (the clock); a system's run starts only if 1.1x its longest run is left (75 s before one)
    res, doc, calls = _fake_bench(gc, tmp_path, monkeypatch, 200.0)
    assert res["status"] == "partial" and "6 runs not started" in res["note"]
    assert [s for _, s, _ in calls] == ["trl", "preftune", "trl-liger"] * 2  # round 1 of both rows
    for row in doc["rows"]:
        assert row["not_run"] == ["trl-liger", "preftune", "trl"]  # round 2
        assert row["summary"]["systems"]["preftune"]["runs"] == 1
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| llama1b/response-heavy/2048 | trl-liger | 8 | 1 |" in md
