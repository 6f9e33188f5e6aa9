"""torch.distributed plumbing, in three pieces: :mod:`~preftune.distributed.context` (the process group
from torchrun's environment and the collectives: :class:`DistContext`, :func:`init_distributed`),
:mod:`~preftune.distributed.wrap` (DDP / FSDP2 wrapping, gradient sync, the global gradient norm) and
:mod:`~preftune.distributed.checkpoint` (checkpoints under DDP and FSDP, the gathered final state dict).
Without torchrun (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) every helper is a no-op or the
plain single-process version, so the loop has one code path.

Choices, and why:

- **Process group.** ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``; we join with
  ``gloo`` on CPU and ``nccl`` (plus gloo for CPU tensors) on GPU, with a finite timeout (``PREFTUNE_DIST_TIMEOUT_S``, default 1800 s)
  so a collective whose peer died raises instead of hanging. A rank that fails prints
  ``preftune: rank R/N failed: ...`` and exits non-zero; torchrun then stops the others.
- **Parallelism.** ``train.parallel``: ``auto`` = ``ddp`` under torchrun. DDP wraps the
  :mod:`preftune.model` log-prob module (the whole log-prob computation is its ``forward``). FSDP2
  (``fully_shard``) shards every decoder layer (:func:`preftune.model.decoder_layer_classes`), then the root; its
  gradients are DTensors and :func:`~preftune.distributed.wrap.clip_grad_norm` returns their global norm. Both
  average gradients over ranks; the trainer's loss is normalised by totals over all ranks and multiplied by the
  world size (docs/FORMULAS.md "Exact accumulation"). Non-final micro-steps skip gradient sync (DDP ``no_sync``,
  FSDP2 ``set_requires_gradient_sync(False)``).
- **Empty shares.** The sampler deals the last global batch interleaved, so a rank can get an empty
  micro-batch while others do not. DDP and FSDP need every rank to run the same forwards/backwards (their
  hooks are collectives), so such a rank runs a *placeholder* (the layout's, :meth:`preftune.model.Layout.placeholder`):
  its shortest pair with weight 0, excluded from the pair/token totals and metrics. Its loss is exactly 0 and so
  are its gradient contributions; the result equals one process on the whole batch. (Changing the sampler to
  never give empty shares would change which pairs form a step, so one process and N processes would no longer
  train on the same batches.)
- **Metrics.** Window sums (pair metrics, loss, pair count, tokens) are summed over ranks at each log step
  (:meth:`preftune.evaluation.StepMetrics.all_reduce` with :meth:`DistContext.all_reduce_sum`), so logged
  numbers are global; rank 0 alone writes them.
- **Reference.** ``copy``: a frozen copy per rank (under FSDP sharded the same way, resharded after each
  forward). ``precomputed``: each rank computes an interleaved share of the pairs (in length order, so the
  work is balanced: :meth:`DistContext.shard_indices`), the tables are summed over ranks
  (:meth:`DistContext.gather_table`: each row is non-zero on exactly one rank, so the sum is exact), rank 0
  writes the cache file, every rank keeps the full table.
- **Checkpoints.** DDP: rank 0 writes one ordinary checkpoint (all ranks hold the same weights). FSDP: every
  rank writes its shards with ``torch.distributed.checkpoint`` into ``dcp/`` of rank 0's staging folder, then
  rank 0 adds scheduler/RNG/state and the ``COMPLETE`` marker and renames the folder into place (same atomic
  convention as :mod:`preftune.checkpoint`). Resume needs the same world size. The final model is gathered to
  rank 0 and saved as one ordinary Hugging Face folder.
"""

from preftune.distributed.context import (
    TIMEOUT_ENV,
    DistContext,
    init_distributed,
    resolve_parallel,
)

__all__ = ["TIMEOUT_ENV", "DistContext", "init_distributed", "resolve_parallel"]
