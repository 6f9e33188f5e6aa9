"""The process group and its collectives: :class:`DistContext` (who this rank is, sums, broadcasts, barriers,
a parallel no-grad pass's shares) and :func:`init_distributed` (join what torchrun describes, or run alone).

Knows ranks and tensors only: no model, optimizer or checkpoint (those are :mod:`~preftune.distributed.wrap`
and :mod:`~preftune.distributed.checkpoint`, which take a context).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

__all__ = ["TIMEOUT_ENV", "DistContext", "init_distributed", "resolve_parallel"]

log = logging.getLogger(__name__)

#: Environment variable: seconds a collective may wait before it raises (default 1800).
TIMEOUT_ENV = "PREFTUNE_DIST_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 1800.0


def resolve_parallel(parallel: str, world_size: int) -> str:
    """``none`` single-process, else ``ddp`` or ``fsdp`` (``auto`` = ``ddp``)."""
    if world_size <= 1:
        return "none"
    return "ddp" if parallel == "auto" else parallel


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # we initialised the process group, so we destroy it
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy (GPU only)
    # The FSDP2 device mesh, made once by preftune.distributed.wrap on first use.
    device_mesh: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def load_device(self) -> torch.device:
        """Where models are loaded: FSDP loads on CPU and ``fully_shard`` moves only the shards to the GPU."""
        return torch.device("cpu") if self.parallel == "fsdp" else self.device

    # -----------------------------------------------------------------------------------------------
    # Collectives

    def _comm(self, tensor: Tensor) -> Tensor:
        """NCCL reduces device tensors only; gloo takes CPU tensors."""
        if self.device.type == "cuda" and tensor.device.type != "cuda":
            return tensor.to(self.device)
        return tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks, in place (also returned)."""
        if self.enabled:
            t = self._comm(tensor)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            if t is not tensor:
                tensor.copy_(t)
        return tensor

    def sum(self, value: float) -> float:
        """A host number summed over ranks."""
        if not self.enabled:
            return value
        return float(self.all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64))[0])

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a stop signal seen by one rank)."""
        return self.sum(1.0 if flag else 0.0) > 0 if self.enabled else bool(flag)

    def all(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) == self.world_size if self.enabled else bool(flag)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        t = self._comm(torch.tensor([int(value)], dtype=torch.int64))
        torch.distributed.broadcast(t, src=0)
        return int(t[0])

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0, then on the others (which then hit the cache rank 0 filled)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    @contextlib.contextmanager
    def running(self) -> Iterator[DistContext]:
        """Wrap a whole run: a failure is reported with the rank; the process group is destroyed at the end.

        After a failure the group is left to process exit: a collective with a dead peer may not return.
        """
        try:
            yield self
        except BaseException as exc:
            if self.enabled:
                msg = " ".join(str(exc).split()) or type(exc).__name__
                print(
                    f"preftune: rank {self.rank}/{self.world_size} failed: {type(exc).__name__}: {msg}",
                    file=sys.stderr,
                    flush=True,
                )
                if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's summary shows the cause
                    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

                    ErrorHandler().record_exception(exc)
            raise
        self.close()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.owns_group = False

    # -----------------------------------------------------------------------------------------------
    # A parallel no-grad pass (the precomputed reference's tables)

    def shard_indices(self, lengths: Sequence[int]) -> tuple[list[int], list[int]]:
        """This rank's share of ``range(len(lengths))`` for a parallel no-grad pass: ``(owned, work)``.

        Owned rows are dealt interleaved in length order (balanced work). ``work`` pads ``owned`` to the
        longest share with a row owned by rank 0, so that every rank runs the same number of forwards (FSDP's
        collectives need it); rows not owned are discarded.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        owned = order[self.rank :: self.world_size]
        longest = -(-len(order) // self.world_size)
        work = owned + [order[0]] * (longest - len(owned))
        return owned, work

    def gather_table(self, table: Tensor, owned: Sequence[int]) -> Tensor:
        """Every rank's owned rows into one full table (zero elsewhere, then summed: exact)."""
        if not self.enabled:
            return table
        mask = torch.zeros(table.shape[0], dtype=torch.bool)
        mask[torch.as_tensor(list(owned), dtype=torch.long)] = True
        table = torch.where(mask.view(-1, *([1] * (table.dim() - 1))), table, 0.0)
        return self.all_reduce_sum(table)


def init_distributed(
    device: torch.device, parallel: str = "auto", *, cpu_offload: bool = False
) -> DistContext:
    """Join the process group torchrun describes in the environment, or run single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if parallel in ("ddp", "fsdp"):
            log.info("train.parallel=%s ignored: one process (launch with torchrun)", parallel)
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not torch.distributed.is_initialized():
        # On GPUs, gloo beside NCCL serves collectives on CPU tensors (FSDP CPU offload's grad norm).
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)))
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
        owns = True
    mode = resolve_parallel(parallel, world_size)
    if cpu_offload and (mode != "fsdp" or device.type != "cuda"):
        log.info("train.fsdp_cpu_offload ignored: it applies to FSDP on GPUs")
        cpu_offload = False
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        parallel=mode,
        owns_group=owns,
        cpu_offload=cpu_offload,
    )
