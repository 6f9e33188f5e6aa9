"""The demo runner: a quick run leaves the report files with finite numbers; the shipped config is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import load_config
from preftune.demo import BASE_MODEL_DIR, run_demo
from preftune.demo.runner import _finite, _sweep_runs, demo_config_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    return run_demo(str(tmp_path_factory.mktemp("demo")), seed=0, quick=True)


def _configured_steps(run: Path) -> int:
    import yaml

    return yaml.safe_load((run / "train" / "config.yaml").read_text())["train"]["max_steps"]


def _logged_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").open()]
    return [r["step"] for r in rows if r["split"] == "train"]


def test_quick_demo_writes_report_files(quick_run: Path):
    for name in (
        "report.json",
        "report.md",
        "curves.png",
        "pairs/train.jsonl",
        "pairs/heldout.jsonl",
    ):
        assert (quick_run / name).is_file(), name
    final = quick_run / "train" / "final"
    assert (final / "config.json").is_file()
    assert (quick_run / "train" / "metrics.jsonl").is_file()
    assert (quick_run / "curves.png").stat().st_size > 1000


def test_quick_demo_numbers_are_finite(quick_run: Path):
    report = json.loads((quick_run / "report.json").read_text())
    assert _finite(report)
    for row in (report["base"], report["tuned"]):
        assert 0.0 <= row["greedy_accuracy"] <= 1.0 and 0.0 <= row["sampled_accuracy"] <= 1.0
    assert 0.0 <= report["tuned"]["implicit"]["accuracy"] <= 1.0
    assert report["base"]["kl"] == pytest.approx(0.0, abs=1e-5)  # base against itself
    # The report's step count is what the run trained: its own config's, and its last logged step.
    assert (
        report["runs"][0]["steps"] == _configured_steps(quick_run) == _logged_steps(quick_run)[-1]
    )
    md = (quick_run / "report.md").read_text()
    assert "task reward, greedy" in md and "KL" in md


def test_a_second_demo_into_the_same_folder_trains_afresh(quick_run: Path):
    """`make demo` twice: the rerun replaces the previous demo's run folder (never resumes into it)."""
    first = json.loads((quick_run / "report.json").read_text())
    run_demo(str(quick_run), seed=0, quick=True)
    second = json.loads((quick_run / "report.json").read_text())
    assert second["runs"][0]["steps"] == first["runs"][0]["steps"]
    assert second["tuned"] == first["tuned"]  # the same seed trains the same model again
    steps = _logged_steps(quick_run)
    # one run's rows, not two runs appended
    assert steps == sorted(steps) and steps[-1] == _configured_steps(quick_run)


def test_demo_config_is_valid_and_copied():
    load_config(demo_config_path(), [f"model.path={BASE_MODEL_DIR}"])  # validates, or raises
    # configs/demo.yaml is the readable copy of the packaged file: keep them identical.
    assert (REPO / "configs" / "demo.yaml").read_text() == demo_config_path().read_text()


def test_sweep_points():
    assert _sweep_runs(None) == [{}]
    assert _sweep_runs({"beta": [0.5, 1.0]}) == [{"beta": 0.5}, {"beta": 1.0}]
    with pytest.raises(ValueError):
        _sweep_runs({"beta": []})
