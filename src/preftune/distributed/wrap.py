"""Models under data parallelism: the policy wrapped in DDP or sharded with FSDP2, a frozen reference sharded
the same way, gradient sync skipped on non-final micro-steps, and the global gradient norm.

Reads the model's decoder layer classes (:func:`preftune.model.decoder_layer_classes`, the FSDP units) from
the model layer; knows nothing of losses, data or checkpoints.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from preftune.distributed.context import DistContext

__all__ = ["clip_grad_norm", "grad_sync", "shard_frozen", "wrap_policy"]


def _mesh(dist: DistContext):
    from torch.distributed.device_mesh import init_device_mesh

    if dist.device_mesh is None:
        dist.device_mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    return dist.device_mesh


def _fully_shard(dist: DistContext, root: nn.Module, causal_lm: nn.Module, **kwargs: Any) -> None:
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
    offload = CPUOffloadPolicy() if dist.cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=_mesh(dist), offload_policy=offload, **kwargs)
    fully_shard(root, mesh=_mesh(dist), offload_policy=offload, **kwargs)


def wrap_policy(dist: DistContext, policy: nn.Module) -> nn.Module:
    """The module the training forward goes through: DDP around ``policy``, or ``policy`` sharded (FSDP2),
    or ``policy`` itself in one process."""
    if dist.parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # LM buffers (rotary tables) are constants: no broadcast before every forward.
        no_sync = "forward_sync_buffers" in inspect.signature(DDP).parameters  # newer torch
        return DDP(
            policy,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # no second copy of the gradients
            **{"forward_sync_buffers" if no_sync else "broadcast_buffers": False},
        )
    if dist.parallel == "fsdp":
        _fully_shard(dist, policy, policy.model)
    return policy


def shard_frozen(dist: DistContext, module: nn.Module) -> nn.Module:
    """A frozen (reference) log-prob module: sharded like the policy under FSDP, else unchanged.

    The root is resharded after every forward too (there is no backward to keep it for).
    """
    if dist.parallel == "fsdp":
        _fully_shard(dist, module, module.model, reshard_after_forward=True)
    return module


def grad_sync(
    dist: DistContext, module: nn.Module, sync: bool
) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on non-final micro-steps of a window."""
    if dist.parallel == "fsdp":
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if dist.parallel == "ddp" and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> Tensor:
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
