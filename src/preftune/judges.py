"""Judges: ``score(prompt, completions, record=None) -> list[float]``, higher is better.

A judge is chosen by a spec string (:func:`load_judge`):

- ``python:MODULE:FUNCTION`` — any callable ``f(prompt, completions)`` returning one number per completion
  (verifiable rewards: unit tests, exact answers). MODULE is a dotted module (the current folder is on the
  path) or a ``.py`` file. A function that takes a ``record`` argument also gets the sample's other input
  columns (``fields`` of the samples file: a reference answer, test cases, ...).
- ``reward-model:PATH_OR_HUB_ID`` — an ``AutoModelForSequenceClassification`` with one label, batched; the
  conversation is rendered with the reward model's own chat template (prompt + the completion as the
  assistant turn); without a template, the text is prompt + completion.
- ``rules:`` (or ``rules:COLUMN``) — instruction-following checks in the spirit of IFEval, configured per
  prompt by the ``rules`` column (a list of ``{"name": ..., "args": ...}``, args a dict, a list or one
  value, or just the name). The score is the share of the prompt's rules a completion passes (1.0 = all).
  An empty answer passes no rule (otherwise "answer in lowercase" would reward saying nothing).

Failures never lose a run (:func:`judge_rows`): a call that raises (or returns a wrong number of values, or
a non-finite one) is retried sample by sample; the samples that still fail get the score ``None`` and are
reported with their prompt index, and counted.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RULES",
    "JudgeError",
    "JudgeReport",
    "judge_rows",
    "load_judge",
]


class JudgeError(ValueError):
    """A judge that cannot be built (a usage error), or a judge call that failed on a sample."""


# ------------------------------------------------------------------------------------------------ rules


def _words(text: str) -> int:
    return len(re.findall(r"\w+(?:['’]\w+)*", text))


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if re.search(r"\w", s)])


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _has(text: str, needle: str, case_sensitive: bool, whole_word: bool) -> bool:
    flags = 0 if case_sensitive else re.IGNORECASE
    pattern = rf"(?<!\w){re.escape(needle)}(?!\w)" if whole_word else re.escape(needle)
    return re.search(pattern, text, flags) is not None


def _json(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())  # a fenced block counts
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _last_number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text)  # 1,000.5 is one number
    return float(found[-1].replace(",", "")) if found else None


def _norm(text: str, case_sensitive: bool) -> str:
    return text.strip() if case_sensitive else text.strip().lower()


# Each rule: (text, **args) -> passed. Names and arguments are what a `rules` column may use.
RULES: dict[str, Callable[..., bool]] = {
    "lowercase": lambda t: t == t.lower(),
    "uppercase": lambda t: t == t.upper(),
    "min_words": lambda t, n: _words(t) >= int(n),
    "max_words": lambda t, n: _words(t) <= int(n),
    "min_sentences": lambda t, n: _sentences(t) >= int(n),
    "max_sentences": lambda t, n: _sentences(t) <= int(n),
    "max_chars": lambda t, n: len(t.strip()) <= int(n),
    "include": lambda t, text, case_sensitive=False, whole_word=False: all(
        _has(t, s, case_sensitive, whole_word) for s in _as_list(text)
    ),
    "exclude": lambda t, text, case_sensitive=False, whole_word=False: (
        not any(_has(t, s, case_sensitive, whole_word) for s in _as_list(text))
    ),
    "starts_with": lambda t, text, case_sensitive=False: _norm(t, case_sensitive).startswith(
        _norm(str(text), case_sensitive)
    ),
    "ends_with": lambda t, text, case_sensitive=False: _norm(t, case_sensitive).endswith(
        _norm(str(text), case_sensitive)
    ),
    "json": _json,
    "no_letter": lambda t, letter: str(letter).lower() not in t.lower(),
    "no_comma": lambda t: "," not in t,
    "quoted": lambda t: len(t.strip()) >= 2 and t.strip()[0] == t.strip()[-1] == '"',
    "bullets": lambda t, n: len(re.findall(r"^\s*[*-]\s", t, re.MULTILINE)) == int(n),
    "regex": lambda t, pattern: re.search(str(pattern), t) is not None,
    # Content, not form: the first word answers a yes/no question; the last number is the result.
    "yes_no": lambda t, answer: (
        (re.findall(r"[a-z]+", t.lower()) or [""])[0] == str(answer).strip().lower()
    ),
    "number": lambda t, value, tol=1e-6: (
        (x := _last_number(t)) is not None and abs(x - float(value)) <= float(tol)
    ),
}


def _rule_call(entry: Any) -> tuple[str, Callable[[str], bool]]:
    """A rules-column entry -> (name, check(text))."""
    if isinstance(entry, str):
        name, args, kwargs = entry, [], {}
    elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
        name, raw = entry["name"], entry.get("args")
        kwargs = {k: v for k, v in entry.items() if k not in ("name", "args")}
        args = [] if raw is None else list(raw) if isinstance(raw, list) else [raw]
        if isinstance(raw, dict):
            args, kwargs = [], {**kwargs, **raw}
    else:
        raise JudgeError(f"a rule must be a name or {{'name': ..., 'args': ...}}, got {entry!r}")
    if name not in RULES:
        from preftune.data.errors import suggest

        raise JudgeError(f"unknown rule {name!r}{suggest(name, RULES)}; known: {', '.join(RULES)}")
    fn = RULES[name]
    try:
        inspect.signature(fn).bind("", *args, **kwargs)
    except TypeError as e:
        raise JudgeError(f"rule {name!r}: bad arguments {args or kwargs} ({e})") from None
    return name, lambda text: bool(text.strip()) and bool(fn(text, *args, **kwargs))


class RulesJudge:
    def __init__(self, spec: str, column: str):
        self.spec, self.column = spec, column

    def score(self, prompt: Any, completions: Sequence[str], record: dict | None = None):
        rules = (record or {}).get(self.column)
        if isinstance(rules, str):  # e.g. a CSV cell holding JSON
            rules = json.loads(rules)
        if not isinstance(rules, list) or not rules:
            raise JudgeError(f"no rules: column {self.column!r} must hold a non-empty list")
        checks = [_rule_call(entry) for entry in rules]
        return [sum(check(c) for _, check in checks) / len(checks) for c in completions]


# ------------------------------------------------------------------------------------------ python, RM


class PythonJudge:
    def __init__(self, spec: str, target: str):
        module_name, sep, func_name = target.rpartition(":")
        if not sep or not module_name or not func_name:
            raise JudgeError(f"judge {spec!r}: expected python:MODULE:FUNCTION")
        self.spec, module = spec, _import(spec, module_name)
        fn = getattr(module, func_name, None)
        if not callable(fn):
            from preftune.data.errors import suggest

            names = [n for n in vars(module) if callable(getattr(module, n)) and n[0] != "_"]
            raise JudgeError(
                f"judge {spec!r}: {module_name} has no function {func_name!r}{suggest(func_name, names)}"
            )
        self.fn = fn
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # builtins without a signature
            params = {}
        self.wants_record = "record" in params or any(
            p.kind is p.VAR_KEYWORD for p in params.values()
        )

    def score(self, prompt: Any, completions: Sequence[str], record: dict | None = None):
        if self.wants_record:
            return self.fn(prompt, list(completions), record=record or {})
        return self.fn(prompt, list(completions))


def _import(spec: str, name: str) -> Any:
    try:
        if name.endswith(".py") or os.sep in name or "/" in name:
            path = Path(name)
            if not path.is_file():
                raise JudgeError(f"judge {spec!r}: file {name} not found")
            key = f"_preftune_judge_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[key] = module  # dataclasses and pickling look a module up by its name
            mod_spec.loader.exec_module(module)
            return module
        # `preftune` runs as a script, without the current folder on the path: ./my_rewards.py
        # would not import as python:my_rewards:f.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    except JudgeError:
        raise
    except Exception as e:  # the module's own import errors, syntax errors, ...
        raise JudgeError(
            f"judge {spec!r}: cannot import {name} ({type(e).__name__}: {e})"
        ) from None


class RewardModelJudge:
    """A scalar-head sequence classifier. Rows are left-padded with explicit positions, so the last column
    is every row's last real token; the model's pad-based pooling is pointed at it (pad id -1 never
    matches), because a pad id equal to EOS would otherwise pool an earlier token."""

    def __init__(self, spec: str, path: str, *, device: str = "auto", batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification

        from preftune.model import ModelError, load_tokenizer, resolve_device, resolve_source

        self.spec, self.batch_size = spec, batch_size
        try:
            source = resolve_source(path, setting="reward-model")
            self.tokenizer = load_tokenizer(source)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source.name_or_path, dtype=torch.float32, **source.pretrained_kwargs()
            )
        except (ModelError, OSError, ValueError, KeyError) as e:
            raise JudgeError(f"judge {spec!r}: cannot load a reward model ({e})") from None
        if self.model.config.num_labels != 1:
            raise JudgeError(
                f"judge {spec!r}: the model has {self.model.config.num_labels} labels; "
                "a reward model has one (a scalar score)"
            )
        self.model.config.pad_token_id = -1
        self.model.to(resolve_device(device)).eval()
        self.positions = "position_ids" in inspect.signature(self.model.forward).parameters

    def _ids(self, prompt: Any, completion: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            conv = [*msgs, {"role": "assistant", "content": completion}]
            text = tok.apply_chat_template(conv, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        if not isinstance(prompt, str):
            raise JudgeError("message prompts need a reward model tokenizer with a chat template")
        return tok(prompt + completion, add_special_tokens=True)["input_ids"]

    def score(self, prompt: Any, completions: Sequence[str], record: dict | None = None):
        import torch

        rows = [self._ids(prompt, c) for c in completions]
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if self.positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
            device = self.model.device
            with torch.inference_mode():
                logits = self.model(**{k: v.to(device) for k, v in kwargs.items()}).logits
            out.extend(logits[:, 0].float().tolist())
        return out


def load_judge(spec: str, *, device: str = "auto", batch_size: int = 16) -> Any:
    """A judge from its spec string (see the module docstring); JudgeError for a bad spec."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise JudgeError(
            f"judge {spec!r}: expected python:MODULE:FUNCTION, reward-model:PATH or rules:[COLUMN]"
        )
    if kind == "python":
        return PythonJudge(spec, rest)
    if kind == "reward-model":
        if not rest:
            raise JudgeError(f"judge {spec!r}: expected reward-model:PATH_OR_HUB_ID")
        return RewardModelJudge(spec, rest, device=device, batch_size=batch_size)
    if kind == "rules":
        return RulesJudge(spec, rest or "rules")
    from preftune.data.errors import suggest

    raise JudgeError(
        f"judge {spec!r}: unknown kind {kind!r}{suggest(kind, ('python', 'reward-model', 'rules'))}; "
        "expected python:, reward-model: or rules:"
    )


# ----------------------------------------------------------------------------------- scoring sample files


@dataclass
class JudgeReport:
    prompts: int = 0
    samples: int = 0
    failed_samples: int = 0
    failures: list[tuple[int, int | None, str]] = field(default_factory=list)  # (index, k, why)
    scores: list[float] = field(default_factory=list)

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def pass_rate(self) -> float:
        """Share of scored samples at 1.0 or above (all rules passed; a 0/1 reward's successes)."""
        return (
            sum(s >= 1.0 for s in self.scores) / len(self.scores) if self.scores else float("nan")
        )


def _checked(values: Any, n: int) -> list[float]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise JudgeError(f"returned {values!r:.80}; expected a list of {n} numbers")
    values = list(values)  # numpy arrays and tensors too
    if len(values) != n:
        raise JudgeError(f"returned {len(values)} scores for {n} completions")
    out = []
    for v in values:
        if isinstance(v, (bool, int, float)):
            v = float(v)
        elif hasattr(v, "item"):  # numpy / torch scalars
            v = float(v.item())
        else:
            raise JudgeError(f"returned {v!r:.40} among its scores; expected numbers")
        if not math.isfinite(v):
            raise JudgeError(f"returned a non-finite score {v}")
        out.append(v)
    return out


def _why(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def judge_rows(judge: Any, rows: list[dict], *, progress: bool = False) -> JudgeReport:
    """Score every row of a samples file in place (``scores``, ``judge``, ``judge_errors``)."""
    from tqdm import tqdm

    report = JudgeReport(prompts=len(rows))
    for row in tqdm(rows, unit="prompt", disable=not progress, file=sys.stderr):
        completions, record = row["completions"], row.get("fields") or {}
        report.samples += len(completions)
        errors: dict[str, str] = {}
        try:
            scores: list[float | None] = list(
                _checked(judge.score(row["prompt"], completions, record=record), len(completions))
            )
        except (
            Exception
        ) as batch_error:  # retried sample by sample: one bad sample loses only itself
            scores = []
            for k, c in enumerate(completions):
                try:
                    scores.append(_checked(judge.score(row["prompt"], [c], record=record), 1)[0])
                except Exception as e:
                    scores.append(None)
                    errors[str(k)] = _why(e)
            if len(errors) == len(completions):
                report.failures.append((row["index"], None, _why(batch_error)))
            else:
                report.failures.extend((row["index"], int(k), why) for k, why in errors.items())
        report.failed_samples += len(errors)
        report.scores.extend(s for s in scores if s is not None)
        row["scores"], row["judge"] = scores, judge.spec
        row.pop("judge_errors", None)
        if errors:
            row["judge_errors"] = errors
    return report
