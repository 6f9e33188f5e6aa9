"""torch.distributed plumbing: process group from torchrun's environment, DDP / FSDP2 wrapping, reductions,
checkpoints. The trainer calls these through one :class:`DistContext`; without torchrun (no ``WORLD_SIZE``
in the environment, or ``WORLD_SIZE=1``) every helper is a no-op or the plain single-process version, so
the loop has one code path.

Choices, and why:

- **Process group.** ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``; we join with
  ``gloo`` on CPU and ``nccl`` (plus gloo for CPU tensors) on GPU, with a finite timeout (``PREFTUNE_DIST_TIMEOUT_S``, default 1800 s)
  so a collective whose peer died raises instead of hanging. A rank that fails prints
  ``preftune: rank R/N failed: ...`` and exits non-zero; torchrun then stops the others.
- **Parallelism.** ``train.parallel``: ``auto`` = ``ddp`` under torchrun. DDP wraps the
  :mod:`preftune.model` log-prob module (the whole log-prob computation is its ``forward``). FSDP2
  (``fully_shard``) shards every decoder layer (:func:`preftune.model.decoder_layer_classes`), then the root; its
  gradients are DTensors and :meth:`DistContext.clip_grad_norm` returns their global norm. Both average
  gradients over ranks; the trainer's loss is normalised by totals over all ranks and multiplied by the world
  size (docs/FORMULAS.md "Exact accumulation"). Non-final micro-steps skip gradient sync (DDP ``no_sync``, FSDP2
  ``set_requires_gradient_sync(False)``).
- **Empty shares.** The sampler deals the last global batch interleaved, so a rank can get an empty
  micro-batch while others do not. DDP and FSDP need every rank to run the same forwards/backwards (their
  hooks are collectives), so such a rank runs a *placeholder*: its shortest pair with weight 0, excluded from
  the pair/token totals and metrics. Its loss is exactly 0 and so are its gradient contributions; the result
  equals one process on the whole batch. (Changing the sampler to never give empty shares would change which
  pairs form a step, so one process and N processes would no longer train on the same batches.)
- **Metrics.** Window sums (pair metrics, loss, pair count, tokens) are summed over ranks at each log step,
  so logged numbers are global; rank 0 alone writes them.
- **Reference.** ``copy``: a frozen copy per rank (under FSDP sharded the same way, resharded after each
  forward). ``precomputed``: each rank computes an interleaved share of the pairs (in length order, so the
  work is balanced), the tables are summed over ranks (each row is non-zero on exactly one rank, so the sum
  is exact), rank 0 writes the cache file, every rank keeps the full table.
- **Checkpoints.** DDP: rank 0 writes one ordinary checkpoint (all ranks hold the same weights). FSDP: every
  rank writes its shards with ``torch.distributed.checkpoint`` into ``dcp/`` of rank 0's staging folder, then
  rank 0 adds scheduler/RNG/state and the ``COMPLETE`` marker and renames the folder into place (same atomic
  convention as :mod:`preftune.checkpoint`). Resume needs the same world size. The final model is gathered to
  rank 0 and saved as one ordinary Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from preftune.checkpoint import (
    CHECKPOINTS_DIR,
    TrainState,
    checkpoint_dir_name,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
)

__all__ = [
    "TIMEOUT_ENV",
    "DistContext",
    "init_distributed",
    "resolve_parallel",
]

log = logging.getLogger(__name__)

#: Environment variable: seconds a collective may wait before it raises (default 1800).
TIMEOUT_ENV = "PREFTUNE_DIST_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 1800.0
_DCP_DIR = "dcp"


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
    _device_mesh: Any = field(default=None, repr=False, compare=False)

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
    # Models

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        if self._device_mesh is None:
            self._device_mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self._device_mesh

    def _fully_shard(self, root: nn.Module, causal_lm: nn.Module, **kwargs: Any) -> None:
        """FSDP2: one unit per decoder layer, then the root."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        from preftune.model import decoder_layer_classes, unwrap_causal_lm

        lm = unwrap_causal_lm(causal_lm)
        classes = decoder_layer_classes(lm)
        layers = [m for m in lm.modules() if isinstance(m, classes)] if classes else []
        if not layers:
            raise ValueError(
                f"train.parallel=fsdp: {type(lm).__name__} names no decoder layer class "
                "(_no_split_modules); use train.parallel=ddp"
            )
        offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        for layer in layers:
            fully_shard(layer, mesh=self._mesh(), offload_policy=offload, **kwargs)
        fully_shard(root, mesh=self._mesh(), offload_policy=offload, **kwargs)

    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        """The module the training forward goes through: DDP around ``policy``, or ``policy`` sharded."""
        if self.parallel == "ddp":
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # LM buffers (rotary tables) are constants: no broadcast before every forward.
            no_sync = "forward_sync_buffers" in inspect.signature(DDP).parameters  # newer torch
            return DDP(
                policy,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # no second copy of the gradients
                **{"forward_sync_buffers" if no_sync else "broadcast_buffers": False},
            )
        if self.parallel == "fsdp":
            self._fully_shard(policy, policy.model)
        return policy

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen (reference) SequenceLogpsModel: sharded like the policy under FSDP, else unchanged.

        The root is resharded after every forward too (there is no backward to keep it for).
        """
        if self.parallel == "fsdp":
            self._fully_shard(module, module.model, reshard_after_forward=True)
        return module

    def grad_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient reduction on non-final micro-steps of a window."""
        if self.parallel == "fsdp":
            module.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if self.parallel == "ddp" and not sync:
            return module.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> Tensor:
        """The global gradient norm (FSDP: over all shards), clipping to ``max_norm`` when set."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
        return full() if callable(full) else norm

    # -----------------------------------------------------------------------------------------------
    # Metrics and reference tables

    def reduce_metrics(self, metrics) -> None:
        """Sum a StepMetrics' window sums and counts over ranks, so that its means are global (the grad
        norm already is). Every rank has the same metric names (the same objective)."""
        if not self.enabled:
            return
        names, packed = metrics.packed()
        metrics.unpack(names, self.all_reduce_sum(packed))

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

    # -----------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(
        self,
        run_dir: Path,
        state: TrainState,
        *,
        model,
        optimizer,
        scheduler,
        keep_last: int,
        extra_models: dict[str, nn.Module] | None = None,
    ) -> Path:
        """Collective: write the checkpoint of ``state.step`` (see the module docstring); its folder.

        ``extra_models``: other modules whose weights change in training (TR-DPO's reference), saved beside
        the model (FSDP: in the same distributed checkpoint)."""
        extra_models = extra_models or {}
        final = Path(run_dir) / CHECKPOINTS_DIR / checkpoint_dir_name(state.step)
        if self.parallel != "fsdp":
            if self.is_main:
                final = save_checkpoint(
                    run_dir,
                    state,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    keep_last=keep_last,
                    extra_state_dicts={k: m.state_dict() for k, m in extra_models.items()},
                )
            self.barrier()
            return final
        import shutil

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        tmp = staging_dir(run_dir, state.step, pid=self.broadcast_int(os.getpid()))
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
        sd.update({f"extra.{k}": get_model_state_dict(m) for k, m in extra_models.items()})
        dcp.save(sd, checkpoint_id=tmp / _DCP_DIR)
        self.barrier()
        if self.is_main:
            final = save_checkpoint(
                run_dir,
                state,
                model=None,
                optimizer=None,
                scheduler=scheduler,
                keep_last=keep_last,
                staged_dir=tmp,
            )
        self.barrier()
        return final

    def load_checkpoint(
        self,
        path: Path,
        *,
        model,
        optimizer,
        scheduler,
        extra_models: dict[str, nn.Module] | None = None,
    ) -> TrainState:
        """Every rank restores the checkpoint (FSDP: its shards, via ``torch.distributed.checkpoint``)."""
        extra_models = extra_models or {}
        path = Path(path)
        written_by_fsdp = (path / _DCP_DIR).is_dir()
        if written_by_fsdp != (self.parallel == "fsdp"):
            raise ValueError(
                f"checkpoint {path} was written with train.parallel="
                f"{'fsdp' if written_by_fsdp else 'ddp or one process'}; resume with the same setting"
            )
        if self.parallel != "fsdp":
            return load_checkpoint(
                path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                extra_models=extra_models,
            )
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
        sd.update({f"extra.{k}": get_model_state_dict(m) for k, m in extra_models.items()})
        dcp.load(sd, checkpoint_id=path / _DCP_DIR)
        set_state_dict(
            model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"]
        )
        for k, m in extra_models.items():
            set_model_state_dict(m, sd[f"extra.{k}"])
        # Counters, schedule and RNG states last (as load_checkpoint does for one process).
        return load_checkpoint(path, model=None, optimizer=None, scheduler=scheduler)

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """Collective under FSDP: the full model state dict on rank 0 (CPU), empty elsewhere; else None."""
        if self.parallel != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        # Tied weights (embeddings = LM head) come back under every name; keep the first, as
        # save_pretrained does for an unsharded model, so the folder is the one DDP would write.
        seen: set[int] = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                full.pop(name, None)
            seen.add(id(param))
        return full


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
