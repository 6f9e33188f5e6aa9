"""The trainer's public hooks: ``preftune.trainer.train(cfg, callbacks=[...])`` calls each callback's
:meth:`Callback.on_step_end` after every optimizer step, so that a harness (the bench, a notebook, a test)
can time steps, watch metrics or see which pairs formed a step without patching the library.

```python
from preftune.callbacks import Callback
from preftune.trainer import train

class Timer(Callback):
    def on_step_end(self, step, metrics, batch):
        print(step, batch.wall_s, batch.pairs, metrics and metrics["loss"])

train(cfg, callbacks=[Timer()])
```

When it is called: on every rank, after the optimizer and scheduler step of optimizer step ``step``
(1-based) and after that step's metrics row is logged, before the step's eval and checkpoint. ``metrics`` is
the logged row (global: summed over ranks; ``loss``, ``rewards/*``, ``logps/*``, ``grad_norm``,
``learning_rate``, ``tokens_per_s``, ...) on a log step (``log.log_every``, and the last step), else None.
``batch`` (:class:`StepInfo`) describes this rank's share of the step. A callback that raises stops the run
like any other error (the last complete checkpoint stays). Callbacks must not change the model, optimizer or
batches: they watch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Callback", "StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """This rank's micro-batches of one optimizer step (its accumulation window).

    ``indices[k]``: the rows of the run's tokenized training split in micro-batch ``k``, as the sampler
    dealt them (an empty tuple for a zero-weight placeholder: a rank whose share of the last batch is
    empty). With no dropped rows and no eval split drawn from the training files, row ``i`` is line ``i``
    of the training data. ``tokens[k][j]``: ``(prompt, chosen, rejected)`` token counts of pair
    ``indices[k][j]`` as trained (after truncation; BOS and EOS included). ``wall_s``: host seconds from
    the window's collation to the end of the scheduler step (on a GPU, kernels may still be in flight:
    synchronize first to time the device).
    """

    indices: tuple[tuple[int, ...], ...]
    tokens: tuple[tuple[tuple[int, int, int], ...], ...]
    wall_s: float

    @property
    def pairs(self) -> list[int]:
        """Every row of the step, micro-batch after micro-batch."""
        return [i for micro in self.indices for i in micro]

    @property
    def num_tokens(self) -> int:
        """Tokens of the step's pairs, each prompt counted once (the throughput's count)."""
        return sum(sum(t) for micro in self.tokens for t in micro)


class Callback:
    """Base class of the trainer's callbacks: override the hooks you need (each does nothing here)."""

    def on_step_end(self, step: int, metrics: Mapping[str, float] | None, batch: StepInfo) -> None:
        """After optimizer step ``step``: its logged metrics row (None between log steps) and its batch."""
