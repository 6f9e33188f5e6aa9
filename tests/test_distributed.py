"""Training under torchrun (CPU, gloo, 2 processes, a tiny Llama) against one process.

Each run is a real ``python -m torch.distributed.run --nproc_per_node=2 --standalone -m preftune train
cfg.yaml`` subprocess; the one-process baselines run in this process. Runs are cached per module so that the
equality, FSDP and resume tests share them.

Tolerances (fp32): two processes with half batches are not bitwise one process with the whole batch. Each
rank pads its micro-batch to its own longest row and sums its own pairs, and the all-reduce adds the two rank
sums, so the gradient sums the same terms in another order: ~1e-7 relative per gradient entry (the
precomputed reference table, batched differently per rank, adds ~1e-6 to the log-probs). AdamW divides by
sqrt(v) + eps, which can amplify an absolute gradient error on entries with tiny gradients, so weights are
compared with ``atol=2e-5, rtol=1e-4``: measured max |diff| after 4 steps at lr=3e-3 is 3e-7 (sigmoid) and
4e-6 (sigmoid+sft, precomputed reference), while a real mistake moves weights by ~lr (dropping the
x world_size factor, or giving the empty-share placeholder a non-zero weight, both fail this test). FSDP vs
DDP: the reduce-scatter adds the same two rank sums as the all-reduce (measured <= 1e-8). First-step losses
use 1e-6 relative. Resume compares a run with itself, so it must be bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _tiny import tiny_train_config, toy_pairs, write_jsonl

from preftune.config import Config, config_to_dict

SRC = Path(__file__).resolve().parents[1] / "src"
WEIGHTS_ATOL, WEIGHTS_RTOL = 2e-5, 1e-4
LOSS_TOL = 1e-6
TIMEOUT_S = 240

# Used by the slow (to be killed) and failing runs: patch, then run the CLI as `-m preftune` would.
_RUNNER = """
import os, sys, time
import torch
mode = os.environ["PREFTUNE_TEST_MODE"]
if mode == "slow":
    real_step = torch.optim.AdamW.step
    def slow_step(self, *a, **k):
        time.sleep(1.0)
        return real_step(self, *a, **k)
    torch.optim.AdamW.step = slow_step
elif mode == "fail":
    import preftune.trainer as trainer
    real = trainer.window_backward
    calls = []
    def failing(*a, **k):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 2:
            raise RuntimeError("injected failure at step 2")
        return real(*a, **k)
    trainer.window_backward = failing
from preftune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


def _cfg(model: Path, data: Path, out: Path, **over) -> Config:
    cfg = tiny_train_config(model, data, out, **{"train__device": "cpu", **over})
    cfg.data.cache_dir = str(out.parent / "cache")  # per run: no run reads another's cache
    return cfg


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PREFTUNE_CACHE": str(cache),
        "PREFTUNE_DIST_TIMEOUT_S": "60",
        **extra,
    }


def _launch(cfg: Config, *, runner: Path | None = None, **env: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 --standalone -m preftune train cfg.yaml`` (or the test runner)."""
    out = Path(cfg.train.output_dir)
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    target = [str(runner)] if runner else ["-m", "preftune"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    return subprocess.Popen(
        [*cmd, *target, "train", str(cfg_file)],
        env=_env(out.parent / "cache", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _torchrun(cfg: Config, **kw) -> str:
    proc = _launch(cfg, **kw)
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, output
    return output


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def _metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _assert_close_weights(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = 0.0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=WEIGHTS_ATOL, rtol=WEIGHTS_RTOL, msg=k)
        worst = max(worst, float((wa[k] - wb[k]).abs().max()))
    return worst


def _moved(start: Path, run: Path) -> float:
    from safetensors.torch import load_file

    w0 = load_file(start / "model.safetensors")
    return max(float((w - w0[k]).abs().max()) for k, w in _weights(run).items())


# Scenarios. "uneven": 17 pairs, global batch 8 -> the third batch has 1 pair, so rank 1's share is empty
# (the placeholder); an eval file is evaluated every 2 steps. "accum": 13 pairs, 4 per global micro-batch, 2 micro-batches per step -> the second
# window is [4, 1] pairs: rank 1 gets [2, empty]; with sigmoid+sft the token counts differ per rank, and the
# reference is precomputed in parallel.
SCENARIOS = {
    "uneven": dict(
        n_pairs=17,
        over=dict(train__max_steps=4, train__save_every=2, train__eval_every=2),
        eval_pairs=5,
        one=dict(train__batch_size=8),
        two=dict(train__batch_size=4),
    ),
    "accum": dict(
        n_pairs=13,
        over=dict(
            train__max_steps=4,
            train__grad_accum=2,
            loss__name=["sigmoid", "sft"],
            loss__weights=[1.0, 0.5],
            reference__strategy="precomputed",
        ),
        one=dict(train__batch_size=4),
        two=dict(train__batch_size=2),
    ),
}


@pytest.fixture(scope="module")
def runs(tiny_dir, work):
    """``runs(scenario, mode)`` -> run folder, trained once per module (mode: one | ddp | fsdp)."""
    done: dict[tuple[str, str], Path] = {}

    def get(scenario: str, mode: str) -> Path:
        if (scenario, mode) in done:
            return done[scenario, mode]
        spec = SCENARIOS[scenario]
        data = write_jsonl(work / f"{scenario}.jsonl", toy_pairs(spec["n_pairs"], seed=4))
        base = work / f"{scenario}-{mode}"
        base.mkdir()
        per_device = spec["one"] if mode == "one" else spec["two"]
        cfg = _cfg(tiny_dir, data, base / "run", **spec["over"], **per_device)
        cfg.reference.cache_dir = str(base / "cache")
        if spec.get("eval_pairs"):
            eval_file = work / f"{scenario}-eval.jsonl"
            cfg.data.eval_files = [
                str(write_jsonl(eval_file, toy_pairs(spec["eval_pairs"], seed=5)))
            ]
        if mode == "one":
            from preftune.trainer import train

            train(cfg)
        else:
            cfg.train.parallel = mode
            _torchrun(cfg)
        done[scenario, mode] = base / "run"
        return base / "run"

    return get


@pytest.mark.parametrize("scenario", ["uneven", "accum"])
def test_ddp_two_processes_equal_one_process(runs, tiny_dir, scenario):
    one, ddp = runs(scenario, "one"), runs(scenario, "ddp")
    worst = _assert_close_weights(one, ddp)
    assert _moved(tiny_dir, ddp) > 100 * WEIGHTS_ATOL, "training must move the weights"
    m1, m2 = _metrics(one), _metrics(ddp)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    # Logged metrics are global (summed over ranks), so they match one process too.
    for a, b in zip(m1, m2):
        for key in ("loss", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=LOSS_TOL)
    e1, e2 = _metrics(one, "eval"), _metrics(ddp, "eval")
    assert len(e1) == len(e2)
    for a, b in zip(e1, e2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    print(f"{scenario}: max |w_ddp - w_one| = {worst:.2e}")


def test_precomputed_reference_is_computed_in_parallel(runs):
    one, ddp = runs("accum", "one"), runs("accum", "ddp")
    tables = []
    for run in (one, ddp):
        files = list((run.parent / "cache" / "reference").glob("*.pt"))
        assert len(files) == 1, files  # written once, by rank 0
        tables.append(torch.load(files[0], weights_only=True)["tables"]["train"])
    assert tables[0].shape == tables[1].shape == (13, 2)
    assert (tables[1] != 0).all(), "every pair's row must come from some rank"
    torch.testing.assert_close(tables[1], tables[0], atol=1e-5, rtol=1e-6)


def test_fsdp_matches_ddp(runs):
    ddp, fsdp = runs("uneven", "ddp"), runs("uneven", "fsdp")
    m_ddp, m_fsdp = _metrics(ddp), _metrics(fsdp)
    assert m_fsdp[0]["loss"] == pytest.approx(m_ddp[0]["loss"], rel=LOSS_TOL)
    # Clipping sees the global norm of the sharded (DTensor) gradients.
    assert m_fsdp[0]["grad_norm"] == pytest.approx(m_ddp[0]["grad_norm"], rel=1e-5)
    worst = _assert_close_weights(ddp, fsdp)
    e_ddp, e_fsdp = _metrics(ddp, "eval"), _metrics(fsdp, "eval")
    # A step-0 point, then every eval_every steps; the last one is the final eval (not run twice).
    assert [r["step"] for r in e_fsdp] == [r["step"] for r in e_ddp] == [0, 2, 4]
    assert e_fsdp[-1]["loss"] == pytest.approx(e_ddp[-1]["loss"], rel=1e-4)
    ckpt = fsdp / "checkpoints" / "step-00000004"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "dcp").is_dir()
    # The final model is one ordinary HF folder that loads without preftune.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    print(f"max |w_fsdp - w_ddp| = {worst:.2e}")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_kill_then_resume_under_torchrun_continues_bitwise(runs, tiny_dir, work, mode):
    """SIGKILL the whole job (agent and both ranks) after the step-2 checkpoint; a plain relaunch resumes
    from it and ends bitwise where the uninterrupted run ends."""
    full = runs("uneven", mode)
    spec = SCENARIOS["uneven"]
    base = work / f"resume-{mode}"
    base.mkdir()
    runner = base / "runner.py"
    runner.write_text(_RUNNER)
    data = work / "uneven.jsonl"
    cfg = _cfg(tiny_dir, data, base / "run", **spec["over"], **spec["two"], train__parallel=mode)
    victim = _launch(cfg, runner=runner, PREFTUNE_TEST_MODE="slow")
    marker = base / "run" / "checkpoints" / "step-00000002" / "COMPLETE"
    deadline = time.time() + TIMEOUT_S
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), victim.communicate()[0] if victim.poll() is not None else "timeout"
    workers = _children(victim.pid)
    for pid in [*workers, victim.pid]:
        os.kill(pid, signal.SIGKILL)
    victim.communicate()
    assert len(workers) == 2
    assert not (base / "run" / "final").exists(), "the kill must land before the run ends"

    relaunched = time.time()
    _torchrun(cfg)
    rows = _metrics(base / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Steps 1-2 were logged by the killed job and kept; the relaunch resumed at step 2.
    assert [r["time"] < relaunched for r in rows] == [True, True, False, False]
    a, b = _weights(full), _weights(base / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_failing_rank_brings_the_job_down(tiny_dir, work):
    base = work / "fail"
    base.mkdir()
    runner = base / "runner.py"
    runner.write_text(_RUNNER)
    data = write_jsonl(base / "d.jsonl", toy_pairs(16, seed=4))
    cfg = _cfg(tiny_dir, data, base / "run", train__batch_size=4, train__max_steps=6)
    t0 = time.time()
    proc = _launch(cfg, runner=runner, PREFTUNE_TEST_MODE="fail")
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    elapsed = time.time() - t0
    assert proc.returncode != 0, output
    assert "rank 1/2 failed: RuntimeError: injected failure at step 2" in output, output
    assert elapsed < 60 + 45, f"took {elapsed:.0f}s: the job must not wait out the timeout"
