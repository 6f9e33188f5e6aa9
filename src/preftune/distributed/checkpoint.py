"""Checkpoints under data parallelism (collectives: every rank calls them). DDP and one process: rank 0
writes one ordinary :mod:`preftune.checkpoint` (all ranks hold the same weights). FSDP: every rank writes its
shards with ``torch.distributed.checkpoint`` into ``dcp/`` of rank 0's staging folder, then rank 0 adds
scheduler/RNG/state and the ``COMPLETE`` marker and renames the folder into place. Resume needs the same
world size; the final model is gathered to rank 0 (:func:`full_state_dict`).

Knows the checkpoint's file layout only through :mod:`preftune.checkpoint`; knows nothing of the loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from preftune.checkpoint import (
    CHECKPOINTS_DIR,
    TrainState,
    checkpoint_dir_name,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
)
from preftune.distributed.context import DistContext

__all__ = ["full_state_dict", "load", "save"]

_DCP_DIR = "dcp"


def save(
    dist: DistContext,
    run_dir: Path,
    state: TrainState,
    *,
    model,
    optimizer,
    scheduler,
    keep_last: int,
    extra_models: dict[str, nn.Module] | None = None,
) -> Path:
    """Collective: write the checkpoint of ``state.step``; its folder.

    ``extra_models``: other modules whose weights change in training (TR-DPO's reference), saved beside
    the model (FSDP: in the same distributed checkpoint)."""
    extra_models = extra_models or {}
    final = Path(run_dir) / CHECKPOINTS_DIR / checkpoint_dir_name(state.step)
    if dist.parallel != "fsdp":
        if dist.is_main:
            final = save_checkpoint(
                run_dir,
                state,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                keep_last=keep_last,
                extra_state_dicts={k: m.state_dict() for k, m in extra_models.items()},
            )
        dist.barrier()
        return final
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    tmp = staging_dir(run_dir, state.step, pid=dist.broadcast_int(os.getpid()))
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    sd.update({f"extra.{k}": get_model_state_dict(m) for k, m in extra_models.items()})
    dcp.save(sd, checkpoint_id=tmp / _DCP_DIR)
    dist.barrier()
    if dist.is_main:
        final = save_checkpoint(
            run_dir,
            state,
            model=None,
            optimizer=None,
            scheduler=scheduler,
            keep_last=keep_last,
            staged_dir=tmp,
        )
    dist.barrier()
    return final


def load(
    dist: DistContext,
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
    if written_by_fsdp != (dist.parallel == "fsdp"):
        raise ValueError(
            f"checkpoint {path} was written with train.parallel="
            f"{'fsdp' if written_by_fsdp else 'ddp or one process'}; resume with the same setting"
        )
    if dist.parallel != "fsdp":
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
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    for k, m in extra_models.items():
        set_model_state_dict(m, sd[f"extra.{k}"])
    # Counters, schedule and RNG states last (as load_checkpoint does for one process).
    return load_checkpoint(path, model=None, optimizer=None, scheduler=scheduler)


def full_state_dict(dist: DistContext, model: nn.Module) -> dict[str, Tensor] | None:
    """Collective under FSDP: the full model state dict on rank 0 (CPU), empty elsewhere; else None."""
    if dist.parallel != "fsdp":
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
