"""Reference strategies: where π_ref's log-probs come from (docs/FORMULAS.md "The reference model").

Each strategy has one job, answering ``logps(batch, split)`` with detached ``(ref_chosen_logps,
ref_rejected_logps)`` for a batch of the run's :class:`~preftune.model.Layout`:

- :class:`CopyReference`: a frozen copy of the starting policy (or another folder), eval mode, no grad.
- :class:`PrecomputedReference`: log-probs computed once at θ₀ before training, cached on disk under a key
  that hashes the reference weights, the tokenized data and the settings; the model is freed afterwards. The
  file carries its key, row counts and a checksum of its values, verified on load: a corrupt, truncated or
  mismatched file is logged and recomputed, never used.
- :class:`AdapterReference`: with LoRA, the policy itself with its adapters disabled.

Recomputing "reference" log-probs from the weights being trained is wrong after the first step and is
deliberately not offered.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from preftune.data import pair_lengths
from preftune.model import Layout, PairBatch, SequenceLogps, unwrap_causal_lm

__all__ = [
    "AdapterReference",
    "CopyReference",
    "PrecomputedReference",
    "Reference",
    "ReferenceLogps",
    "hash_weights",
    "precompute_logps",
]

log = logging.getLogger(__name__)


@dataclass
class ReferenceLogps:
    """Detached reference log-prob sums of a batch's pairs (and LD-DPO's prefix sums when computed)."""

    chosen_logps: Tensor  # [B]
    rejected_logps: Tensor  # [B]
    chosen_prefix_logps: Tensor | None = None  # [B]
    rejected_prefix_logps: Tensor | None = None  # [B]

    @classmethod
    def of(cls, out: SequenceLogps) -> ReferenceLogps:
        return cls(
            out.chosen_logps.detach(),
            out.rejected_logps.detach(),
            None if out.chosen_prefix_logps is None else out.chosen_prefix_logps.detach(),
            None if out.rejected_prefix_logps is None else out.rejected_prefix_logps.detach(),
        )

    def columns(self) -> Tensor:
        """``[B, 2]`` (chosen, rejected), or ``[B, 4]`` with the prefixes: a precomputed table's rows."""
        cols = [self.chosen_logps, self.rejected_logps]
        if self.chosen_prefix_logps is not None and self.rejected_prefix_logps is not None:
            cols += [self.chosen_prefix_logps, self.rejected_prefix_logps]
        return torch.stack(cols, dim=1)


class Reference:
    """Interface: detached reference log-prob sums for the pairs of a collated batch."""

    key: str | None = None

    def logps(self, batch: PairBatch, split: str = "train") -> ReferenceLogps:
        raise NotImplementedError


class CopyReference(Reference):
    """A frozen copy of the starting policy (never the weights being trained), run in the run's layout."""

    def __init__(self, model: nn.Module, layout: Layout, *, copy: bool = True):
        """``copy=False`` freezes ``model`` itself (a model loaded only to be the reference)."""
        frozen = _copy.deepcopy(unwrap_causal_lm(model)) if copy else unwrap_causal_lm(model)
        frozen.eval()
        frozen.requires_grad_(False)
        self.layout = layout
        self.module = layout.module(frozen)

    @torch.no_grad()
    def logps(self, batch: PairBatch, split: str = "train") -> ReferenceLogps:
        return ReferenceLogps.of(self.layout.logps(self.module, batch))

    @property
    def weights(self) -> nn.Module:
        """The frozen model (what a checkpoint saves when the reference is updated in training)."""
        return unwrap_causal_lm(self.module.model)

    def check_sync(self, policy: nn.Module) -> None:
        """TR-DPO needs parameter for parameter the same shapes as the policy (not another model)."""
        ref = {n: p.shape for n, p in self.weights.named_parameters()}
        pol = {n: p.shape for n, p in unwrap_causal_lm(policy).named_parameters()}
        if ref != pol:
            differ = sorted(set(ref.items()) ^ set(pol.items()))[:3]
            raise ValueError(
                "reference.sync: the reference model's parameters differ from the policy's "
                f"(e.g. {differ}); TR-DPO updates a copy of the policy"
            )

    @torch.no_grad()
    def sync_from(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656, Eqs. 5-6): θ_ref ← α·θ + (1 − α)·θ_ref
        (soft update); α = 1 is the hard update θ_ref ← θ."""
        ref = dict(self.weights.named_parameters())
        for name, p in unwrap_causal_lm(policy).named_parameters():
            if alpha == 1.0:
                ref[name].copy_(p.detach())
            else:
                ref[name].lerp_(p.detach(), alpha)


class AdapterReference(Reference):
    """The LoRA policy with adapters disabled: the base weights are frozen, so this is π at θ₀."""

    def __init__(self, policy: nn.Module, layout: Layout):
        if not hasattr(policy.model, "disable_adapter"):
            raise ValueError("the adapter reference needs a PEFT (LoRA) model")
        self.policy = policy
        self.layout = layout

    @torch.no_grad()
    def logps(self, batch: PairBatch, split: str = "train") -> ReferenceLogps:
        # Eval mode: with model.dropout on, the policy trains with noise but θ₀'s log-probs have none.
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.model.disable_adapter():
                return ReferenceLogps.of(self.layout.logps(self.policy, batch))
        finally:
            self.policy.train(was_training)


class PrecomputedReference(Reference):
    """Reference log-probs looked up by pair index from tables computed once at θ₀."""

    def __init__(self, tables: dict[str, Tensor], key: str):
        # split -> [N, 2] fp32 (chosen, rejected), or [N, 4] with LD-DPO's prefixes
        self.tables = tables
        self.key = key

    def logps(self, batch: PairBatch, split: str = "train") -> ReferenceLogps:
        table = self.tables[split]
        rows = table[batch.index.to(table.device)].to(batch.weights.device)  # [B, 2 or 4]
        return ReferenceLogps(*rows.unbind(1))

    @staticmethod
    def cache_path(cache_dir: Path, key: str) -> Path:
        return Path(cache_dir) / "reference" / f"{key}.pt"

    @classmethod
    def load(
        cls, cache_dir: Path, key: str, rows: dict[str, int] | None = None
    ) -> PrecomputedReference | None:
        """The cached tables of ``key``, or None when there are none or they cannot be trusted.

        The file must hold this key, a ``[N, 2]`` float32 table per split with the ``rows`` expected
        (when given: ``{split: number of pairs}``), and the checksum of those tables stored with them. A
        file that fails any of this (truncated, corrupt, or well-formed but with other values) is logged
        in one line and ignored: the caller recomputes the tables and overwrites it.
        """
        path = cls.cache_path(cache_dir, key)
        if not path.is_file():
            return None
        why = None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch, zip and pickle errors all mean "unreadable"
            payload, why = (
                None,
                f"unreadable ({' '.join(str(e).split())[:120] or type(e).__name__})",
            )
        if why is None:
            why = _cache_problem(payload, key, rows)
        if why is not None:
            log.warning("reference log-probs cache %s: %s; recomputing", path, why)
            return None
        return cls(payload["tables"], key)

    def save(self, cache_dir: Path) -> Path:
        """Write the tables with their key, row counts and checksum, atomically."""
        path = self.cache_path(cache_dir, self.key or "unkeyed")
        path.parent.mkdir(parents=True, exist_ok=True)
        tables = {k: v.detach().float().cpu().contiguous() for k, v in self.tables.items()}
        payload = {
            "key": self.key,
            "tables": tables,
            "rows": {k: int(v.shape[0]) for k, v in tables.items()},
            "checksum": _tables_checksum(tables),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
        return path


def _tables_checksum(tables: dict[str, Tensor]) -> str:
    """SHA-256 over every split's name, shape and values: a cache with other numbers never passes."""
    h = hashlib.sha256()
    for split in sorted(tables):
        t = tables[split].detach().float().cpu().contiguous()
        h.update(f"{split}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _cache_problem(payload, key: str, rows: dict[str, int] | None) -> str | None:
    """Why a loaded cache payload cannot be used, or None."""
    if not isinstance(payload, dict) or not isinstance(payload.get("tables"), dict):
        return "not a reference log-prob cache"
    if payload.get("key") != key:
        return f"written for key {payload.get('key')!r}, not {key!r}"
    tables = payload["tables"]
    for split, table in tables.items():
        ok = isinstance(table, Tensor) and table.dim() == 2 and table.shape[1] in (2, 4)
        if not ok or table.dtype != torch.float32:
            return f"split {split!r} is not a [N, 2] or [N, 4] float32 table"
    counts = {k: int(v.shape[0]) for k, v in tables.items()}
    if payload.get("rows") != counts:
        return f"row counts {counts} do not match the recorded {payload.get('rows')}"
    if rows is not None and {k: n for k, n in rows.items() if n} != counts:
        return f"row counts {counts}, expected {rows} for this data"
    if payload.get("checksum") != _tables_checksum(tables):
        return "its checksum does not match its contents"
    return None


def hash_weights(model: nn.Module) -> str:
    """Content hash of every parameter and buffer, so a cache can never outlive the weights it came from."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(unwrap_causal_lm(model).state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        t = tensor.detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def precompute_logps(
    module: nn.Module,
    dataset,
    layout: Layout,
    *,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    progress: bool = True,
    desc: str = "reference log-probs",
    indices: list[int] | None = None,
) -> Tensor:
    """One no-grad pass of ``module`` (``layout``'s log-prob module) over ``dataset`` (or the given
    ``indices`` of it): table [N, 2] of log-prob sums ([N, 4] with the prefix sums of LD-DPO).

    Pairs are visited in length order so that batches carry little padding.
    """
    from tqdm.auto import tqdm

    n = len(dataset)
    table = torch.zeros(n, 4 if "prefix" in layout.extras else 2, dtype=torch.float32)
    order = list(range(n)) if indices is None else list(indices)
    lengths = pair_lengths(dataset)
    order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = layout.collate([dataset[i] for i in idx]).to(device)
        with autocast():
            out = layout.logps(module, batch)
        rows = ReferenceLogps.of(out).columns().float().cpu()
        table[torch.as_tensor(idx)] = rows
    return table
