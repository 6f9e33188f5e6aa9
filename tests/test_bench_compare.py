"""bench/compare.py's smallest row end to end (``tiny``, one warm-up and one timed step per system; preftune
alone where TRL is not installed): the plan, the child processes, the preftune worker watching the trainer
through its public callbacks, the summaries and the tables. A renamed trainer hook or a broken worker fails
here instead of in the next benchmark run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = "tiny/prompt-heavy/512/default"


def test_smallest_row_runs_and_reports(tmp_path):
    systems = ["preftune"] + (["trl"] if importlib.util.find_spec("trl") else [])
    argv = [
        sys.executable, str(REPO / "bench" / "compare.py"),
        "--rows", f"^{ROW}$", "--rounds", "1", "--warmup", "1", "--steps", "1",
        "--systems", ",".join(systems), "--workdir", str(tmp_path / "work"),
        "--out", str(tmp_path / "out.json"), "--logs", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]

    doc = json.loads((tmp_path / "out.json").read_text())
    (row,) = doc["rows"]
    assert row["row"]["systems"] == systems
    runs = {r["system"]: r for r in row["runs"]}
    assert set(runs) == set(systems)
    p = runs["preftune"]
    assert "error" not in p, p
    # Two steps of two pairs, every pair of the one-epoch file once, token ids and counts as in the data.
    assert len(p["step_end_times"]) == 2 and p["step_end_times"][0] < p["step_end_times"][1]
    assert sorted(i for step in p["step_pairs"] for i in step) == [0, 1, 2, 3]
    assert p["tokens_match_data"] is True
    # The first losses and log-probs (the exactness rows' numbers): policy = reference at step 1.
    assert math.isclose(p["losses"][0], math.log(2), abs_tol=1e-6)
    assert len(p["logps_chosen_mean"]) == 2 and p["logps_chosen_mean"][0] < 0
    summary = row["summary"]["systems"]["preftune"]
    assert summary["runs"] == 1 and summary["tokens_per_s"]["median"] > 0
    assert summary["reference"] == "copy"
    assert f"| {ROW} | preftune | copy |" in proc.stdout
