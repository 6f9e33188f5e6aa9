"""preftune.loop and preftune.geneval: a 2-round on-policy loop on a tiny model (folders, report, resume),
and the generation eval on a hand-checkable case (a model against itself)."""

from __future__ import annotations

import json
import math

import pytest
from _tiny import make_tiny_llama, write_jsonl

JUDGE = '''
def score(prompt, completions):
    """Share of the letter a: a rule the random tiny model passes now and then (1.0 = all a's)."""
    return [c.count("a") / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    make_tiny_llama(root / "model")
    words = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "bee", "owl"]
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"say {w}:"} for w in words])
    write_jsonl(root / "heldout.jsonl", [{"prompt": f"now {w}?"} for w in words[:4]])
    (root / "judge_a.py").write_text(JUDGE)
    return root


def _cfg(root, **loop):
    from _tiny import tiny_train_config

    cfg = tiny_train_config(
        root / "model", root / "prompts.jsonl", root / "run",
        train__max_steps=2, train__batch_size=4, optim__lr=1e-2,
    )  # fmt: skip
    cfg.loop.rounds = 2
    cfg.loop.prompts = [str(root / "prompts.jsonl")]
    cfg.loop.eval_prompts = [str(root / "heldout.jsonl")]
    cfg.loop.judge = f"python:{root / 'judge_a.py'}:score"
    cfg.loop.samples, cfg.loop.max_new_tokens, cfg.loop.eval_samples = 6, 8, 2
    cfg.loop.batch_size = 4
    cfg.loop.keep_truncated = True  # a random tiny model rarely says EOS within 8 tokens
    for k, v in loop.items():
        setattr(cfg.loop, k, v)
    return cfg


def test_two_rounds_leave_runs_evals_and_a_report_and_resume_does_nothing_twice(setup):
    from preftune.loop import run_loop

    root = run_loop(_cfg(setup))
    for r in (1, 2):
        out = root / f"round-{r}"
        for name in ("samples.jsonl", "scored.jsonl", "pairs.jsonl", "eval.json", "times.json"):
            assert (out / name).is_file(), (r, name)
        assert (out / "run" / "final" / "model.safetensors").is_file()
        pairs = [json.loads(line) for line in (out / "pairs.jsonl").open()]
        assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    first = json.loads((root / "round-0" / "eval.json").read_text())
    # Round 0 is the initial model against itself: same answers, log-ratio 0, every comparison a tie.
    assert first["sampled/kl"] == pytest.approx(0.0, abs=1e-4)
    assert first["sampled/win_rate"] == 0.5 and first["greedy/win_rate"] == 0.5
    last = json.loads((root / "round-2" / "eval.json").read_text())
    assert {"greedy/pass_rate", "sampled/mean_words", "sampled/kl", "sampled/truncated"} <= set(
        last
    )
    assert math.isfinite(last["sampled/kl"])
    report = (root / "loop_report.md").read_text()
    assert [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")][
        1:
    ] == ["0", "1", "2"]
    assert (root / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun finds every stage done: nothing is sampled, trained or evaluated again.
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.json*") if "tensorboard" not in str(p)}
    run_loop(_cfg(setup))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_round_two_trains_from_round_one(setup):
    cfg = json.loads((setup / "run" / "round-2" / "run" / "fingerprint.json").read_text())
    assert cfg["settings"]["model.path"] == str(setup / "run" / "round-1" / "run" / "final")


def test_generation_eval_of_a_model_against_itself(setup, tmp_path):
    """pass_rate is the share of answers scoring 1.0 (here: all a's), recomputed from the answers file;
    a model against itself ties everywhere and has a log-ratio of exactly 0 on its answers."""
    from preftune.geneval import generation_eval
    from preftune.judges import load_judge
    from preftune.model import load_model, load_tokenizer, resolve_device, resolve_source
    from preftune.pairs import read_samples
    from preftune.sampling import SamplingSettings, read_prompts

    source = resolve_source(setup / "model")
    model = load_model(source, device=resolve_device("cpu"))
    tokenizer = load_tokenizer(source)
    judge = load_judge(f"python:{setup / 'judge_a.py'}:score")
    decodings = {"sampled": SamplingSettings(num_samples=3, temperature=1.0, max_new_tokens=6)}
    m = generation_eval(
        model, tokenizer, read_prompts(str(setup / "heldout.jsonl")), judge,
        decodings=decodings, out_dir=tmp_path, reference=model,
    )  # fmt: skip
    answers = [
        c for row in read_samples(tmp_path / "reference-sampled.jsonl") for c in row["completions"]
    ]
    expected = sum(c.count("a") / max(len(c), 1) >= 1.0 for c in answers) / len(answers)
    assert m["sampled/answers"] == 12 and m["sampled/pass_rate"] == pytest.approx(expected)
    assert m["sampled/win_rate"] == 0.5 and m["sampled/kl"] == 0.0


def test_cli_geneval_and_loop(setup, tmp_path, capsys):
    from preftune.cli import main

    argv = [
        "geneval", "--model", str(setup / "model"), "--ref", str(setup / "model"),
        "--prompts", str(setup / "heldout.jsonl"), "--judge", f"python:{setup / 'judge_a.py'}:score",
        "--out", str(tmp_path / "ge"), "--samples", "2", "--max-new-tokens", "4", "--json",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["sampled/win_rate"] == 0.5 and "greedy/pass_rate" in metrics
    config = tmp_path / "loop.yaml"
    config.write_text(f"model: {{path: {setup / 'model'}}}\nloop: {{rounds: 1}}\n")
    assert main(["loop", str(config)]) == 2  # no loop.prompts
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loop.prompts" in err[0]


def test_cli_eval_with_a_judge_is_the_generation_eval(setup, tmp_path, capsys):
    from preftune.cli import main

    common = ["--model", str(setup / "model"), "--samples", "2", "--max-new-tokens", "4"]
    generation = [
        "--prompts", str(setup / "heldout.jsonl"), "--judge", f"python:{setup / 'judge_a.py'}:score",
        "--json", "--no-progress",
    ]  # fmt: skip
    assert main(["geneval", *common, *generation, "--out", str(tmp_path / "a")]) == 0
    by_geneval = json.loads(capsys.readouterr().out)
    assert main(["eval", *common, *generation, "--out", str(tmp_path / "b")]) == 0
    by_eval = json.loads(capsys.readouterr().out)
    assert by_eval == by_geneval and "greedy/pass_rate" in by_eval
    # the two modes are exclusive and a generation eval names what it lacks, in one line, exit 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    for argv, expected in (
        (
            ["eval", "--model", str(setup / "model"), "--data", str(pairs), "--judge", "rules:"],
            "--data",
        ),
        (
            ["eval", "--model", str(setup / "model"), "--judge", "rules:"],
            "missing --prompts, --out",
        ),
        (["eval", "--model", str(setup / "model")], "give --data FILE"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_train_with_a_generation_eval_logs_it_and_trains_the_same(setup, tmp_path, capsys):
    """The ``geneval`` section: pass rates at step 0, at each eval point and at the end; the losses equal
    to a run without it (the eval draws no number from the training stream and restores train mode)."""
    from _tiny import tiny_train_config, toy_pairs

    from preftune.cli import main
    from preftune.tracking import read_metrics
    from preftune.trainer import train

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(24))

    def run(name, **geneval):
        cfg = tiny_train_config(
            setup / "model", data, tmp_path / name, train__max_steps=3, train__eval_every=2
        )
        for k, v in geneval.items():
            setattr(cfg.geneval, k, v)
        train(cfg)
        return read_metrics(tmp_path / name)

    judge = f"python:{setup / 'judge_a.py'}:score"
    plain = run("plain")
    rows = run(
        "geneval", prompts=[str(setup / "heldout.jsonl")], judge=judge, samples=2,
        max_new_tokens=4, batch_size=3,
    )  # fmt: skip
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert losses == [r["loss"] for r in plain if r.get("split") == "train"] and len(losses) == 3
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in evals:
        assert 0.0 <= r["geneval/greedy/pass_rate"] <= 1.0
        assert r["geneval/greedy/answers"] == 4 and r["geneval/sampled/answers"] == 8
    assert (tmp_path / "geneval" / "geneval" / "step-3" / "policy-sampled.jsonl").is_file()
    # a judge that cannot be built fails before any model loads, in one line, exit 2
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(
        f"model: {{path: {setup / 'model'}}}\ndata: {{train_files: [{data}]}}\n"
        f"train: {{output_dir: {tmp_path / 'bad'}}}\n"
        f"geneval: {{prompts: [{setup / 'heldout.jsonl'}], judge: 'oracle:x'}}\n"
    )
    capsys.readouterr()
    assert main(["train", str(cfg_file)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "geneval.judge: judge 'oracle:x': unknown kind" in err[0], err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_answer_logps_equal_a_float64_forward_with_answers_paired(setup):
    """Answers of one prompt share a pair (1, 2 and 3 answers: an odd one paired with itself); each sum
    equals log π(y|x) from a plain float64 forward of prompt + answer (EOS included when sampled)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.geneval import answer_logps
    from preftune.sampling import _prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(setup / "model")
    model = AutoModelForCausalLM.from_pretrained(setup / "model").float()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 40, (n,), generator=g).tolist()

    rows = [
        {"prompt": "say cat:", "completion_ids": [ids(5)]},
        {"prompt": "now dog?", "completion_ids": [ids(3), [*ids(7), tokenizer.eos_token_id]]},
        {"prompt": "a", "completion_ids": [ids(1), ids(4), ids(6)]},
    ]
    got = answer_logps(model, tokenizer, rows, chat=False, batch_size=2)
    exact = model.double()
    for row, values in zip(rows, got):
        prompt = _prompt_ids(tokenizer, row["prompt"], False)
        for answer, value in zip(row["completion_ids"], values, strict=True):
            full = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = exact(full).logits.log_softmax(-1)[0, len(prompt) - 1 : -1]
            expected = logp.gather(-1, torch.tensor(answer)[:, None]).sum().item()
            assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("geneval.samples=-1", "geneval.samples: must be >= 0, got -1"),
        ("geneval.max_new_tokens=0", "geneval.max_new_tokens: must be >= 1, got 0"),
        ("geneval.temperature=0", "geneval.temperature: must be > 0 (sampling), got 0.0"),
        ("loop.samples=1", "loop.samples: must be >= 2, got 1"),
        ("loop.eval_temperature=nan", "loop.eval_temperature: must be > 0 (sampling), got nan"),
    ],
)
def test_geneval_and_loop_settings_are_checked(override, message):
    from preftune.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_training_generation_eval_leaves_train_mode_and_the_rng_as_they_were(setup, tmp_path):
    """The eval samples in eval mode (``sample_answers`` switches it) and must hand the policy back in train
    mode, with the training RNG where it was."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.geneval import TrainingGenEval
    from preftune.loopspec import GenEvalConfig

    spec = GenEvalConfig(
        prompts=[str(setup / "heldout.jsonl")], judge=f"python:{setup / 'judge_a.py'}:score",
        samples=2, max_new_tokens=3,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(setup / "model").train()
    tokenizer = AutoTokenizer.from_pretrained(setup / "model")
    rng = torch.get_rng_state()
    metrics = TrainingGenEval(spec, tmp_path)(model, tokenizer, step=5)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert metrics["geneval/sampled/answers"] == 8
    assert (tmp_path / "geneval" / "step-5" / "policy-greedy.jsonl").is_file()
