"""The demo end to end: sample pairs from the shipped base model, DPO it with the normal trainer, report.

:func:`run_demo` is what ``preftune demo`` (and ``make demo``) runs. The run folder ends up with::

    RUN/pairs/train.jsonl, RUN/pairs/heldout.jsonl   the base model's own answers, judged into pairs
    RUN/train/                                       the trainer's run folder (config.yaml, metrics.jsonl,
                                                     report.json, final/ = the tuned model)
    RUN/report.json, RUN/report.md                   the before/after table and a few samples
    RUN/curves.png                                   the training/eval curves (preftune plot)
    RUN/sweep.png, RUN/sweep/<key>=<value>/          with a sweep: one trained model per value and the
                                                     reward-vs-KL frontier

Training goes through :func:`preftune.trainer.train` with the config shipped in ``demo.yaml`` (the same
file as ``configs/demo.yaml``); the runner only fills in the model path, the pair files, the output
folder and the seed. ``quick=True`` shortens every stage (tests); the code path is the same.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from preftune.demo import BASE_MODEL_DIR, task

__all__ = ["DEMO_CONFIG", "DemoSizes", "demo_config_path", "run_demo"]

DEMO_CONFIG = "demo.yaml"
"""The demo's training config, a package file of :mod:`preftune.demo` (``configs/demo.yaml`` is a copy)."""

_SWEEP_KEYS = {"beta": "loss.beta", "lr": "optim.lr", "steps": "train.max_steps"}


@dataclass(frozen=True)
class DemoSizes:
    """How much of everything a demo run does (full and quick runs differ only here)."""

    train_prompts: int = 4096  # training prompts sampled from the base model
    samples_per_prompt: int = 4
    max_pairs_per_prompt: int = 2
    heldout_pair_prompts: int = 300  # held-out prompts turned into pairs (implicit-reward accuracy)
    eval_prompts: int = 500  # fixed held-out prompts for the task reward (the base card's 0.522)
    eval_samples: int = 4  # sampled answers per held-out prompt (sampled accuracy, KL)
    overrides: tuple[str, ...] = ()  # config overrides on top of demo.yaml


FULL = DemoSizes()
QUICK = DemoSizes(
    train_prompts=256,
    heldout_pair_prompts=64,
    eval_prompts=100,
    eval_samples=2,
    overrides=("train.max_steps=20", "train.eval_every=10", "log.log_every=10"),
)


def demo_config_path() -> Path:
    """Path of the shipped demo config (``preftune/demo/demo.yaml``)."""
    return Path(str(resources.files("preftune.demo").joinpath(DEMO_CONFIG)))


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt_value(v: float) -> str:
    return f"{v:g}"


def _sweep_runs(sweep: dict[str, list[float]] | None) -> list[dict[str, float]]:
    """One dict of ``{key: value}`` per run (the product over keys); ``[{}]`` without a sweep."""
    if not sweep:
        return [{}]
    keys = list(sweep)
    for k in keys:
        if not sweep[k]:
            raise ValueError(f"sweep {k}: give at least one value")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _overrides_for(point: dict[str, float]) -> list[str]:
    return [f"{_SWEEP_KEYS.get(k, k)}={_fmt_value(v)}" for k, v in point.items()]


def _label(point: dict[str, float]) -> str:
    return ",".join(f"{k}={_fmt_value(v)}" for k, v in point.items())


def run_demo(
    output_dir: str,
    *,
    seed: int = 0,
    quick: bool = False,
    sweep: dict[str, list[float]] | None = None,
) -> Path:
    """Run the demo into ``output_dir`` and return the run folder (holding ``report.md``).

    ``seed`` drives the training-prompt draw, the sampling of the pairs, the trainer's seed and the sampled
    evaluation; the held-out evaluation prompts are fixed (:func:`preftune.demo.task.heldout_prompts`).
    ``sweep`` (e.g. ``{"beta": [0.25, 0.5, 1, 2]}``; keys ``beta``, ``lr``, ``steps`` or dotted config
    keys) trains one model per value on the same pairs and draws the reward-vs-KL frontier.
    """
    import torch

    from preftune.config import load_config, validate
    from preftune.demo import evaluate
    from preftune.demo.pairs import build_pairs, write_pairs
    from preftune.demo.sampling import load_model_and_tokenizer
    from preftune.tracking import plot_run, write_json
    from preftune.trainer import train

    t_start = time.perf_counter()
    sizes = QUICK if quick else FULL
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    points = _sweep_runs(sweep)
    # Resolve every run's config up front, so that a bad sweep key fails before minutes of work.
    cfgs = [load_config(demo_config_path(), [*sizes.overrides, *_overrides_for(p)]) for p in points]
    timings: dict[str, float] = {}

    # 1. Pairs the DPO-paper way: the base (= reference) model's own samples, ranked by the judge.
    t0 = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer(BASE_MODEL_DIR)
    train_prompts = task.sample_prompts(sizes.train_prompts, split="train", seed=seed)
    pair_kw = {
        "samples_per_prompt": sizes.samples_per_prompt,
        "max_pairs_per_prompt": sizes.max_pairs_per_prompt,
    }
    train_pairs, train_stats = build_pairs(base, tokenizer, train_prompts, seed=seed, **pair_kw)
    heldout_pair_prompts = task.heldout_prompts(sizes.heldout_pair_prompts)
    heldout_pairs, heldout_stats = build_pairs(
        base, tokenizer, heldout_pair_prompts, seed=seed + 10_000, **pair_kw
    )
    train_file = write_pairs(train_pairs, run_dir / "pairs" / "train.jsonl")
    heldout_file = write_pairs(heldout_pairs, run_dir / "pairs" / "heldout.jsonl")
    timings["pairs_s"] = time.perf_counter() - t0
    for name, st in (("train", train_stats), ("held-out", heldout_stats)):
        _say(
            f"[demo] {name} pairs: {st['pairs']} from {st['prompts']} prompts x "
            f"{st['samples_per_prompt']} samples (sample accuracy {st['sample_accuracy']:.3f}; "
            f"no pair: {st['all_correct']} all right, {st['all_wrong']} all wrong)"
        )
    if not train_pairs or not heldout_pairs:
        raise RuntimeError("the base model gave no preference pairs (all samples equally good)")

    # 2. DPO with the normal trainer, one run per sweep point (same pairs).
    eval_prompts = task.heldout_prompts(sizes.eval_prompts)
    t0 = time.perf_counter()
    base_row = evaluate.evaluate_model(
        base, base, tokenizer, eval_prompts, num_samples=sizes.eval_samples, seed=seed
    )
    timings["eval_base_s"] = time.perf_counter() - t0
    runs = []
    for point, cfg in zip(points, cfgs):
        sub = run_dir / "sweep" / _label(point) if sweep else run_dir
        train_dir = sub / "train"
        cfg.model.path = str(BASE_MODEL_DIR)
        cfg.data.train_files = [str(train_file)]
        cfg.data.eval_files = [str(heldout_file)]
        cfg.data.cache_dir = str(run_dir / "cache")
        cfg.reference.cache_dir = str(run_dir / "cache")
        cfg.train.output_dir = str(train_dir)
        # A rerun into the same folder starts afresh: the trainer clears the previous demo run under the
        # run-folder lock (never removing files a run does not write).
        cfg.train.overwrite = True
        cfg.train.seed = seed
        validate(cfg)
        label = _label(point) or f"beta={_fmt_value(cfg.loss.beta)}"
        _say(
            f"[demo] DPO ({label}): {cfg.train.max_steps} steps x {cfg.train.batch_size} pairs, "
            f"lr {cfg.optim.lr:g}, reference {cfg.reference.strategy} -> {train_dir}"
        )
        t0 = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t0
        if result.final_model_dir is None:
            raise RuntimeError(f"training left no final model in {train_dir}")
        t0 = time.perf_counter()
        tuned, _ = load_model_and_tokenizer(result.final_model_dir)
        row = evaluate.evaluate_model(
            tuned, base, tokenizer, eval_prompts, num_samples=sizes.eval_samples, seed=seed
        )
        row["implicit"] = evaluate.implicit_reward_accuracy(tuned, base, tokenizer, heldout_pairs)
        curves = plot_run(train_dir, sub / "curves.png")
        runs.append(
            {
                "label": label,
                "point": point,
                "beta": cfg.loss.beta,
                "model_dir": str(result.final_model_dir),
                "train_dir": str(train_dir),
                "curves": str(curves),
                "steps": result.steps,
                "train_seconds": round(train_s, 1),
                "eval_seconds": round(time.perf_counter() - t0, 1),
                "final_eval": result.final_eval,
                "metrics": row,
                "_model": tuned,
            }
        )
    timings["train_eval_s"] = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)

    # 3. The report: the main run is the config's beta if the sweep has it, else the first point.
    default_beta = load_config(demo_config_path()).loss.beta
    main = next((r for r in runs if r["beta"] == default_beta), runs[0])
    samples = evaluate.before_after_samples(base, main["_model"], tokenizer, eval_prompts, n=6)
    if sweep:
        shutil.copyfile(main["curves"], run_dir / "curves.png")
    for r in runs:
        del r["_model"]
    torch_threads = torch.get_num_threads()
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    report = {
        "seed": seed,
        "quick": quick,
        "base_model": str(BASE_MODEL_DIR),
        "config": str(demo_config_path()),
        "pairs": {"train": train_stats, "heldout": heldout_stats},
        "eval_prompts": len(eval_prompts),
        "base": base_row,
        "tuned": main["metrics"],
        "main_run": main["label"],
        "runs": runs,
        "samples": samples,
        "torch_threads": torch_threads,
        "timings": timings,
    }
    if sweep:
        report["sweep"] = {"keys": list(sweep), "plot": str(_plot_sweep(run_dir, base_row, runs))}
    write_json(run_dir / "report.json", report)
    md = _report_md(report, run_dir)
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    _say("")
    _say(md)
    _say(f"[demo] done in {timings['total_s']:.0f} s; report: {run_dir / 'report.md'}")
    return run_dir


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _report_md(report: dict, run_dir: Path) -> str:
    base, tuned = report["base"], report["tuned"]
    imp = tuned["implicit"]
    st = report["pairs"]["train"]
    lines = [
        f"# preftune demo (seed {report['seed']}{', quick' if report['quick'] else ''})",
        "",
        f"DPO ({report['main_run']}) on {st['pairs']} pairs sampled from the base model's own answers "
        f"to {st['prompts']} training prompts; evaluated on {report['eval_prompts']} held-out prompts.",
        "",
        "| held-out | base | tuned |",
        "|---|---:|---:|",
        f"| task reward, greedy (exact sum) | {_pct(base['greedy_accuracy'])} | "
        f"{_pct(tuned['greedy_accuracy'])} |",
        f"| task reward, sampled T=1 | {_pct(base['sampled_accuracy'])} | "
        f"{_pct(tuned['sampled_accuracy'])} |",
        f"| digit-level partial credit, greedy | {base['greedy_partial']:.3f} | "
        f"{tuned['greedy_partial']:.3f} |",
        f"| implicit-reward accuracy ({imp['n']} held-out pairs) | 50.0% (margin 0) | "
        f"{_pct(imp['accuracy'])} (margin {imp['margin']:.2f}) |",
        f"| KL(policy ‖ base), sampled, nats/answer | 0 | {tuned['kl']:.3f} ± "
        f"{tuned['kl_stderr']:.3f} |",
        "",
    ]
    if len(report["runs"]) > 1:
        lines += [
            "## Sweep",
            "",
            "| run | greedy acc | sampled acc | KL (nats) | implicit acc |",
            "|---|---:|---:|---:|---:|",
            f"| base | {_pct(base['greedy_accuracy'])} | {_pct(base['sampled_accuracy'])} | 0 | - |",
        ]
        for r in report["runs"]:
            m = r["metrics"]
            lines.append(
                f"| {r['label']} | {_pct(m['greedy_accuracy'])} | {_pct(m['sampled_accuracy'])} | "
                f"{m['kl']:.3f} | {_pct(m['implicit']['accuracy'])} |"
            )
        lines += ["", f"Reward-vs-KL frontier: `{run_dir / 'sweep.png'}`", ""]
    lines += [
        "## Samples (greedy, held-out)",
        "",
        "| prompt | right | base | tuned |",
        "|---|---|---|---|",
    ]
    for s in report["samples"]:
        mark = {True: "✓", False: "✗"}
        lines.append(
            f"| `{s['prompt']}` | {s['target']} | {s['base']!s} {mark[s['base_correct']]} | "
            f"{s['tuned']!s} {mark[s['tuned_correct']]} |"
        )
    t = report["timings"]
    lines += [
        "",
        f"Curves: `{run_dir / 'curves.png'}` · tuned model: `{report['runs'][0]['model_dir']}`"
        if len(report["runs"]) == 1
        else f"Curves: `{run_dir / 'curves.png'}` (main run; each sweep run has its own)",
        "",
        f"Time: {t['total_s']:.0f} s (pairs {t['pairs_s']:.0f} s, base eval {t['eval_base_s']:.0f} s, "
        f"training + eval {t['train_eval_s']:.0f} s), {report['torch_threads']} torch threads.",
        "",
    ]
    return "\n".join(lines)


def _plot_sweep(run_dir: Path, base_row: dict, runs: list[dict]) -> Path:
    """Reward (greedy and sampled accuracy) against sampled KL, one point per run, base at KL 0."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    kl = [0.0] + [r["metrics"]["kl"] for r in runs]
    for key, name, marker in (
        ("sampled_accuracy", "sampled (T=1)", "o"),
        ("greedy_accuracy", "greedy", "s"),
    ):
        acc = [base_row[key]] + [r["metrics"][key] for r in runs]
        order = sorted(range(len(kl)), key=kl.__getitem__)
        ax.plot(
            [kl[i] for i in order],
            [acc[i] for i in order],
            marker=marker,
            linewidth=0.8,
            alpha=0.8,
            label=f"DPO, {name}",
        )
        ax.axhline(base_row[key], color="grey", linewidth=0.8, linestyle=":")
        for x, y, r in zip(kl[1:], acc[1:], runs):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.annotate("base", (0.0, acc[0]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("KL(π ‖ π_ref), sampled estimate (nats per answer)")
    ax.set_ylabel("task reward (share of exact sums, held-out)")
    ax.set_title("Reward vs KL frontier (held-out addition prompts)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    out = run_dir / "sweep.png"
    fig.savefig(out, dpi=120)
    return out


def _finite(obj) -> bool:
    """Whether every number in a nested report is finite (used by the tests)."""
    if isinstance(obj, bool):
        return True
    if isinstance(obj, (int, float)):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


if __name__ == "__main__":  # python -m preftune.demo.runner OUT [SEED]
    import sys

    print(json.dumps(str(run_demo(sys.argv[1], seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0))))
