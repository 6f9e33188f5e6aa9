"""``preftune loop``: iterative on-policy DPO, from a model, prompts and a judge to a better model.

Round r (``<output_dir>/round-r/``) takes the policy at its start (round 1: the initial model; then the
previous round's ``run/final``) and:

1. **samples** ``loop.samples`` answers per training prompt (``samples.jsonl``, resumable);
2. **judges** them (``scored.jsonl``);
3. builds **pairs** where the judge separates the answers (``pairs.jsonl`` + ``pairs_report.json``: ties,
   all-equal prompts and truncated answers dropped and counted);
4. **trains** on them as an ordinary run folder (``run/``, resumed by ``preftune train``'s own rules); the
   reference is the round's starting policy (``loop.reference: round_start``) or the initial model
   (``initial``);
5. **evaluates** the trained policy on the held-out prompts by generation (``eval/``, greedy and sampled;
   :mod:`preftune.geneval`), against the initial model's answers (win rate, KL to the initial model).

``round-0/eval.json`` evaluates the initial model. Every stage writes its output atomically and is skipped
when the output is there, so a killed loop continues at the stage (and, for training, the step) it died in.
After each round, ``loop_report.md`` (a table per round) and ``rounds.png`` (pass rates, win rate and KL per
round) are rewritten. A GGUF initial model is converted once to a safetensors folder (``initial/``), so
that later loads take a fraction of a second.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from preftune.config import Config, ConfigError
from preftune.loopspec import LoopConfig

__all__ = ["run_loop"]

log = logging.getLogger(__name__)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _initial(cfg: Config, root: Path, device) -> str:
    """The initial model as a path every round can load fast: a GGUF is converted once to ``initial/``."""
    from preftune.build import build_tokenizer, model_source
    from preftune.model import load_model

    source = model_source(cfg)
    if not source.gguf_file:
        return cfg.model.path
    folder = root / "initial"
    if not (folder / "config.json").is_file():
        log.info("loop: converting the GGUF model to %s", folder)
        model = load_model(source, device=device, trust_remote_code=cfg.model.trust_remote_code)
        tmp = root / f".initial-{os.getpid()}"
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(cfg).save_pretrained(tmp)
        os.replace(tmp, folder)
    return str(folder)


def _load(path: str, cfg: Config, device):
    from preftune.model import load_model, load_tokenizer, resolve_source

    source = resolve_source(path)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(source, device=device, trust_remote_code=cfg.model.trust_remote_code)
    return model.eval(), tokenizer


def _settings(loop: LoopConfig, seed: int, *, chat: bool):
    from preftune.geneval import eval_decodings
    from preftune.sampling import SamplingSettings

    train = SamplingSettings(
        num_samples=loop.samples, temperature=loop.temperature, top_p=loop.top_p,
        top_k=loop.top_k, max_new_tokens=loop.max_new_tokens, seed=seed, chat=chat,
    )  # fmt: skip
    decodings = eval_decodings(
        chat=chat, max_new_tokens=loop.max_new_tokens, samples=loop.eval_samples,
        temperature=loop.eval_temperature, seed=1,
    )  # fmt: skip
    return train, decodings


def _evaluate(
    path, reference, reference_path, tokenizer, prompts, judge, decodings, out, root, cfg, dev
):
    """``out/eval.json`` of the model at ``path`` (computed once)."""
    from preftune.geneval import generation_eval

    done = _read_json(out / "eval.json")
    if done is not None:
        return done
    if not prompts:
        return {}
    # Round 0 evaluates the initial model: it is its own reference (no second set of answers).
    policy = reference if path == reference_path else _load(path, cfg, dev)[0]
    metrics = generation_eval(
        policy, tokenizer, prompts, judge, decodings=decodings, out_dir=out / "eval",
        reference=reference, reference_dir=root / "reference-answers",
        batch_size=cfg.loop.batch_size, progress=cfg.log.progress,
    )  # fmt: skip
    (out / "eval").mkdir(parents=True, exist_ok=True)
    _write_json(out / "eval.json", metrics)
    return metrics


def _round_config(cfg: Config, policy: str, initial: str, pairs: Path, run: Path) -> Config:
    """The training config of a round: its policy, its pairs, its folder, its reference."""
    from preftune.loopspec import LoopConfig as _Default

    rc = copy.deepcopy(cfg)
    rc.model.path, rc.model.gguf_file, rc.model.revision, rc.model.tokenizer_path = (
        policy, None, None, None
    )  # fmt: skip
    rc.data.train_files, rc.data.sources = [str(pairs)], []
    rc.data.eval_files, rc.data.eval_sources, rc.data.eval_fraction = [], [], 0.0
    rc.data.weight_column = "weight" if cfg.data.weight_column else None
    rc.data.shape = "auto"
    rc.train.output_dir = str(run)
    rc.reference.path = initial if cfg.loop.reference == "initial" else None
    rc.loop = _Default()  # the loop's own settings do not define a round's training run
    return rc


def run_loop(cfg: Config) -> Path:
    """Run (or continue) the rounds of ``cfg.loop``; returns the loop folder (see the module docstring)."""
    import torch

    from preftune.judges import judge_rows, load_judge
    from preftune.model import resolve_device
    from preftune.pairs import make_pairs, read_samples, write_jsonl
    from preftune.sampling import HFGenerator, read_prompts, sample_to_file
    from preftune.trainer import train

    loop = cfg.loop
    if loop.rounds < 1 or not loop.prompts:
        raise ConfigError("loop: set loop.rounds >= 1 and loop.prompts (training prompt files)")
    root = Path(cfg.train.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    judge = load_judge(loop.judge)
    prompts = read_prompts(loop.prompts)
    eval_prompts = read_prompts(loop.eval_prompts) if loop.eval_prompts else []
    initial = _initial(cfg, root, device)
    reference, tokenizer = _load(initial, cfg, device)
    chat = bool(getattr(tokenizer, "chat_template", None))
    _, decodings = _settings(loop, cfg.train.seed, chat=chat)
    rounds = [{"round": 0, "eval": _evaluate(
        initial, reference, initial, tokenizer, eval_prompts, judge, decodings, root / "round-0",
        root, cfg, device,
    )}]  # fmt: skip
    policy = initial
    for r in range(1, loop.rounds + 1):
        out = root / f"round-{r}"
        out.mkdir(exist_ok=True)
        times = _read_json(out / "times.json") or {}
        known = dict(times)
        settings, _ = _settings(loop, cfg.train.seed + r, chat=chat)
        # 1. sample (resumable) -- skipped once the scored file exists
        scored = out / "scored.jsonl"
        if not scored.is_file():
            t = time.perf_counter()
            model, _ = _load(policy, cfg, device)
            sample_to_file(
                HFGenerator(model, tokenizer, settings), tokenizer, prompts, out / "samples.jsonl",
                settings, batch_size=loop.batch_size, progress=cfg.log.progress,
            )  # fmt: skip
            del model
            times["sample_s"] = time.perf_counter() - t
            # 2. judge
            rows = sorted(read_samples(out / "samples.jsonl"), key=lambda row: row["index"])
            judged = judge_rows(judge, rows)
            times["judge_failures"] = judged.failed_samples
            tmp = out / f".scored.{os.getpid()}.tmp"
            write_jsonl(rows, tmp)
            os.replace(tmp, scored)
        # 3. pairs
        pairs_file = out / "pairs.jsonl"
        if not pairs_file.is_file():
            rows = read_samples(scored)
            pairs, report = make_pairs(
                rows,
                mode=loop.pairs,
                margin=loop.margin,
                weight=bool(cfg.data.weight_column),
                keep_truncated=loop.keep_truncated,
            )
            if not pairs:
                raise ConfigError(
                    f"loop round {r}: the judge separated no answers ({report.summary()}); "
                    "sample more answers (loop.samples) or use a finer judge"
                )
            _write_json(out / "pairs_report.json", vars(report))
            tmp = out / f".pairs.{os.getpid()}.tmp"
            write_jsonl(pairs, tmp)
            os.replace(tmp, pairs_file)
        # 4. train (a normal run folder; resumed by its own rules)
        run = out / "run"
        if not (run / "report.json").is_file() or not (run / "final").is_dir():
            t = time.perf_counter()
            result = train(_round_config(cfg, policy, initial, pairs_file, run))
            times["train_s"] = time.perf_counter() - t
            times["steps"] = result.steps
        policy = str(run / "final")
        # 5. evaluate
        t = time.perf_counter()
        metrics = _evaluate(
            policy, reference, initial, tokenizer, eval_prompts, judge, decodings, out, root, cfg,
            device,
        )  # fmt: skip
        times.setdefault("eval_s", time.perf_counter() - t)
        if times != known:  # a finished round is left exactly as it was
            _write_json(out / "times.json", times)
        rounds.append(
            {
                "round": r,
                "eval": metrics,
                "times": times,
                "pairs": _read_json(out / "pairs_report.json"),
            }
        )
        write_report(root, rounds)
        torch.manual_seed(cfg.train.seed + r)  # the next round's draws do not depend on this one's
    if loop.rounds:
        write_report(root, rounds)
    return root


def _fmt(value: Any, pct: bool = False) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.2f}"


def write_report(root: Path, rounds: list[dict]) -> None:
    """``loop_report.md`` and ``rounds.png`` from the rounds so far."""
    lines = [
        "# preftune loop",
        "",
        "Held-out generation eval after each round (round 0: the initial model); win rate and KL against "
        "the initial model's answers.",
        "",
        "| round | pairs | greedy pass | sampled pass | sampled win rate | KL (nats/answer) | words | "
        "train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rounds:
        e, pairs, times = row.get("eval") or {}, row.get("pairs") or {}, row.get("times") or {}
        lines.append(
            f"| {row['round']} | {pairs.get('pairs', '–')} | {_fmt(e.get('greedy/pass_rate'), True)} "
            f"| {_fmt(e.get('sampled/pass_rate'), True)} | {_fmt(e.get('sampled/win_rate'), True)} "
            f"| {_fmt(e.get('sampled/kl'))} | {_fmt(e.get('sampled/mean_words'))} "
            f"| {_fmt(times.get('train_s'))} |"
        )
    (root / "loop_report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [row["round"] for row in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (
        ("greedy/pass_rate", "greedy pass rate"),
        ("sampled/pass_rate", "sampled pass rate"),
        ("sampled/win_rate", "win rate vs initial"),
    ):
        ax1.plot(
            xs,
            [(row.get("eval") or {}).get(key, float("nan")) for row in rounds],
            "o-",
            label=label,
        )
    ax1.set_xlabel("round")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax2.plot(xs, [(row.get("eval") or {}).get("sampled/kl", float("nan")) for row in rounds], "o-")
    ax2.set_xlabel("round")
    ax2.set_ylabel("KL to the initial model (nats/answer)")
    fig.tight_layout()
    fig.savefig(root / "rounds.png", dpi=100)
    plt.close(fig)
