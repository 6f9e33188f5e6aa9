"""Metrics of FORMULAS.md "Metrics", accumulated on device and synced only when read.

:class:`StepMetrics` sums per-pair quantities as tensors during training (no host sync per micro-step);
:func:`evaluate` runs the loss over an eval split without gradients; :func:`evaluate_model` is the
``preftune eval`` entry point for two model folders and a data file.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from preftune.modeling import SequenceLogps, batch_chosen_tokens, forward_pairs

__all__ = ["StepMetrics", "evaluate", "evaluate_model"]

_PAIR_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/chosen_avg",
    "logps/rejected_avg",
)


class StepMetrics:
    """Running sums of the per-pair metrics since the last read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(_PAIR_KEYS), dtype=torch.float64, device=self.device)
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.pairs = 0
        self.steps = 0

    def add(self, loss_contribution: Tensor, out, pol: SequenceLogps) -> None:
        """One micro-batch: ``loss_contribution`` is its share of the window loss (already normalised)."""
        cr, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        cl, rl = pol.chosen_logps.detach(), pol.rejected_logps.detach()
        per_pair = torch.stack(
            [
                cr,
                rr,
                cr - rr,
                (cr > rr).to(cr.dtype),
                cl,
                rl,
                cl / pol.chosen_tokens.clamp(min=1),
                rl / pol.rejected_tokens.clamp(min=1),
            ]
        )  # [K, B]
        self.sums += per_pair.sum(dim=1).double()
        self.loss += loss_contribution.double()
        self.pairs += cr.shape[0]

    def add_grad_norm(self, grad_norm: Tensor) -> None:
        self.grad_norm += grad_norm.detach().double()
        self.steps += 1

    def pop(self) -> dict[str, float]:
        """Means since the last read (one host sync), then reset."""
        values = torch.cat(
            [self.sums / max(self.pairs, 1), self.loss.view(1), self.grad_norm.view(1)]
        ).tolist()
        steps = max(self.steps, 1)
        row = dict(zip(_PAIR_KEYS, values[: len(_PAIR_KEYS)]))
        row["loss"] = values[-2] / steps
        if self.steps:
            row["grad_norm"] = values[-1] / steps
        self.reset()
        return {"loss": row.pop("loss"), **row}


@torch.no_grad()
def evaluate(
    model,
    reference,
    dataset,
    collate,
    loss_fn,
    *,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    split: str = "eval",
) -> dict[str, float]:
    """Loss and pair metrics over a whole split; the loss is reduced exactly as in training."""
    metrics = StepMetrics(device)
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    micro = []
    total_pairs, total_tokens = 0, 0
    for idx in batches:
        batch = collate([dataset[i] for i in idx])
        b = len(idx)
        total_pairs += b
        total_tokens += batch_chosen_tokens(batch)
        micro.append(batch)
    was_training = model.training
    model.eval()
    try:
        for batch in micro:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                pol = forward_pairs(model, batch)
                ref_c, ref_r = reference.logps(batch, split) if reference else (None, None)
                out = loss_fn(
                    pol.chosen_logps,
                    pol.rejected_logps,
                    ref_c,
                    ref_r,
                    chosen_tokens=pol.chosen_tokens,
                    rejected_tokens=pol.rejected_tokens,
                )
            w = batch["weights"]
            loss = (w * out.losses).sum() / total_pairs + (w * out.token_losses).sum() / max(
                total_tokens, 1
            )
            metrics.add(loss, out, pol)
    finally:
        model.train(was_training)
    metrics.steps = 1
    row = metrics.pop()
    row.pop("grad_norm", None)
    return row


def evaluate_model(
    model_dir: str,
    data_file: str,
    *,
    ref_dir: str | None,
    beta: float,
    batch_size: int,
    max_length: int,
    loss: str = "sigmoid",
) -> dict[str, float]:
    """``preftune eval``: implicit-reward accuracy and margins of ``model_dir`` against ``ref_dir``.

    Without a reference the rewards are β·(average log-prob) of the policy alone (as for SimPO).
    """
    from preftune.build import build_loss_fn, build_tokenizer
    from preftune.config import Config
    from preftune.data import collate_pairs, load_preference_data
    from preftune.modeling import SequenceLogpsModel, load_model, resolve_device
    from preftune.reference import CopyReference

    cfg = Config()
    cfg.model.path = model_dir
    cfg.data.train_files = [data_file]
    cfg.data.max_length = max_length
    cfg.data.max_prompt_length = max_length // 2
    cfg.loss.name = [loss if ref_dir else "simpo"]
    cfg.loss.beta = beta
    if not ref_dir:
        cfg.loss.params = {"gamma_beta_ratio": 0.0}
    device = resolve_device("auto")
    tokenizer = build_tokenizer(cfg)
    data = load_preference_data(cfg.data, tokenizer)
    policy = SequenceLogpsModel(
        load_model(model_dir, device=device), chunk_size=cfg.train.chunk_size
    )
    reference = None
    if ref_dir:
        reference = CopyReference(
            load_model(ref_dir, device=device), chunk_size=cfg.train.chunk_size
        )
    pad_id = tokenizer.pad_token_id

    row = evaluate(
        policy,
        reference,
        data.train,
        lambda ex: collate_pairs(ex, pad_id),
        build_loss_fn(cfg),
        batch_size=batch_size,
        device=device,
        split="train",
    )
    row["pairs"] = float(len(data.train))
    return row
