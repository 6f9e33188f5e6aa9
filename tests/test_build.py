"""preftune.build: a run's parts from its config — cache folder, autocast, objective (hyperparameters from
the loss registry under the config's), the bound loss, optimizer, warm-up and schedule, vocabulary check,
and the reference strategies (a precomputed table cached by content)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from _tiny import make_tiny_llama, toy_pairs, write_jsonl

from preftune import build
from preftune.config import Config
from preftune.data.cache import cache_root
from preftune.losses import LOSSES, UNPAIRED_LOSSES
from preftune.model import ModelError
from preftune.objective import KTOObjective, Objective


def test_cache_root_expands_home_and_treats_an_empty_env_as_unset(monkeypatch):
    assert build.cache_root("~/x") == Path.home() / "x"
    monkeypatch.setenv("PREFTUNE_CACHE", "")
    assert build.cache_root(None) == Path.home() / ".cache" / "preftune"
    monkeypatch.setenv("PREFTUNE_CACHE", "/somewhere")
    assert build.cache_root(None) == Path("/somewhere")
    monkeypatch.setenv("PREFTUNE_CACHE", "~/env-cache")
    assert build.cache_root(None) == Path.home() / "env-cache"
    # one cache folder: the tokenized-data cache sits under the same root
    assert cache_root(None) == build.cache_root(None) / "data"


def test_autocast_is_plain_fp32_on_cpu_unless_asked():
    cfg = Config()
    assert build.autocast_factory(cfg, torch.device("cpu")) is contextlib.nullcontext
    cfg.model.dtype = "bfloat16"
    with build.autocast_factory(cfg, torch.device("cpu"))():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")


def test_objective_takes_the_registry_defaults_under_the_config():
    cfg = Config()
    cfg.loss.name = ["kto"]
    kto = build.build_objective(cfg)
    assert isinstance(kto, KTOObjective)
    assert kto.beta == UNPAIRED_LOSSES["kto"].defaults["beta"]
    cfg.loss.beta, cfg.loss.params = 0.3, {"desirable_weight": 2.0}
    kto = build.build_objective(cfg)
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight) == (0.3, 2.0, 1.0)

    cfg = Config()
    cfg.loss.name, cfg.loss.ld_alpha, cfg.loss.wpo_weighting = ["sigmoid"], 0.5, True
    pair = build.build_objective(cfg)
    assert isinstance(pair, Objective) and pair.extras == ("prefix", "collision")


def test_loss_fn_binds_names_weights_and_hyperparameters():
    """The bound loss equals compute_loss called by hand; β unset = the loss's own default (SimPO's 2)."""
    from preftune.losses import compute_loss

    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    n = torch.tensor([3, 4])
    cfg = Config()
    cfg.loss.name, cfg.loss.weights = ["simpo", "sft"], [1.0, 0.25]
    out = build.build_loss_fn(cfg)(pc, pr, None, None, chosen_tokens=n, rejected_tokens=n)
    want = compute_loss(
        ["simpo", "sft"], pc, pr, chosen_tokens=n, rejected_tokens=n, weights=[1.0, 0.25]
    )
    torch.testing.assert_close(out.losses, want.losses)
    beta = LOSSES["simpo"].defaults["beta"]
    torch.testing.assert_close(out.chosen_rewards, beta * pc / n)


@pytest.mark.parametrize(
    ("scheduler", "factors"),
    [
        ("linear", [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3, 0.0]),
        ("cosine", [1 / 3, 2 / 3, 1.0, 0.75, 0.25, 0.0]),
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedule_warms_up_then_decays(scheduler, factors):
    cfg = Config()
    cfg.optim.lr, cfg.optim.scheduler, cfg.optim.warmup_steps = 1.0, scheduler, 2
    model = torch.nn.Linear(2, 2)
    optimizer = build.build_optimizer(cfg, model)
    schedule = build.build_scheduler(cfg, optimizer, total_steps=5)
    seen = []
    for _ in range(6):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(factors)


def test_warmup_steps_setting_wins_over_the_ratio():
    cfg = Config()
    cfg.optim.warmup_ratio = 0.1
    assert build.warmup_steps(cfg, 50) == 5
    cfg.optim.warmup_steps = 7
    assert build.warmup_steps(cfg, 50) == 7


def test_optimizer_holds_the_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    optimizer = build.build_optimizer(Config(), model)
    (group,) = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model[1].parameters()}
    assert math.isclose(group["lr"], Config().optim.lr)


def test_a_tokenizer_larger_than_the_embeddings_is_a_model_error(tmp_path, tiny_dir):
    cfg = Config()
    cfg.model.path = str(tiny_dir)
    tokenizer = build.build_tokenizer(cfg)
    small, _ = make_tiny_llama(tmp_path / "small", vocab_size=20, save_tokenizer=False)
    with pytest.raises(
        ModelError, match=r"has \d+ tokens but model.path .* has only 20 embeddings"
    ):
        build.check_vocab(cfg, tokenizer, small)
    build.check_vocab(cfg, tokenizer, build.build_policy_model(cfg, torch.device("cpu")))


def test_precomputed_reference_cached_by_content(tiny_dir, tmp_path, monkeypatch):
    """A second run on the same inputs reuses the cached table; changed data invalidates it."""
    from _tiny import tiny_train_config

    from preftune.trainer import train

    calls = []
    real = build.precompute_logps
    monkeypatch.setattr(build, "precompute_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(16, seed=1))
    over = {"reference__strategy": "precomputed", "train__max_steps": 1}
    train(tiny_train_config(tiny_dir, data, tmp_path / "r1", **over))
    assert len(calls) == 1
    train(tiny_train_config(tiny_dir, data, tmp_path / "r2", **over))
    assert len(calls) == 1, "a second run on the same inputs must reuse the cached log-probs"
    write_jsonl(data, toy_pairs(16, seed=2))
    train(tiny_train_config(tiny_dir, data, tmp_path / "r3", **over))
    assert len(calls) == 2, "changed data must invalidate the reference cache"
