"""Whether a plan fits (this machine's free memory, measured) and, when it does not, the cheapest changes
that would make it fit, in order; :func:`plan_memory`, the plan's entry point."""

from __future__ import annotations

import copy
import os
from typing import Any

from preftune.config import Config, resolved_reference_strategy
from preftune.plan.estimate import Advice, MemoryPlan, _arithmetic, _device_kind
from preftune.plan.facts import ModelFacts, model_facts
from preftune.plan.units import GIB

#: CUDA: memory outside the caching allocator besides the context (cuBLAS/cuDNN workspaces).
CUDA_FRAMEWORK_BYTES = GIB // 4

#: Passed as ``available`` to measure this machine's memory (the default); None skips the fit check.
MEASURE = "measure"


def plan_memory(
    cfg: Config,
    *,
    facts: ModelFacts | None = None,
    lengths=None,
    layout: str | None = None,
    world_size: int | None = None,
    device: str | None = None,
    baseline: int | None = None,
    available: int | str | None = MEASURE,
    advise: bool = True,
) -> MemoryPlan:
    """The memory plan of ``cfg`` (see the package docstring, :mod:`preftune.plan`).

    Args:
        facts: the model's facts (default: :func:`model_facts` of ``model.path``).
        lengths: ``[n, 3]`` (prompt, chosen, rejected) token counts of the training pairs
            (:func:`data_lengths`, :func:`lengths_of`); None: ``data.max_length``'s upper bound.
        layout: ``shared_prompt`` or ``padded`` when known (the setup probe's); else predicted.
        world_size: processes (default: ``WORLD_SIZE`` of torchrun, else 1).
        device: ``cpu`` / ``cuda`` (default: ``train.device``, ``auto`` = CUDA when present).
        baseline: the framework's bytes (default: measured, see :func:`framework_bytes`).
        available: bytes the run may use per process; ``MEASURE`` (default) reads this machine; None: no
            fit check.
        advise: when it does not fit, list the cheapest changes that would (:attr:`MemoryPlan.advice`).
    """
    facts = facts if facts is not None else model_facts(cfg)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
    kind = _device_kind(cfg, device)
    if baseline is None:
        baseline = framework_bytes(kind)
    plan = _arithmetic(cfg, facts, lengths, layout, world, kind, baseline)
    if available == MEASURE:
        plan.processes_here = _processes_here(world)
        measured = available_memory(kind)
        if measured is None:
            plan.notes.append(f"free {kind} memory cannot be measured here: no fit check")
        else:
            plan.available, plan.available_how = measured
            if kind != "cuda":
                plan.available += baseline  # this process's own memory is already resident
                plan.available //= plan.processes_here
    elif available is not None:
        plan.available, plan.available_how = int(available), "given"
    if plan.available is not None:
        plan.fits = plan.total <= plan.available
        if not plan.fits and advise:
            plan.advice = _advice(
                cfg, facts, lengths, layout, world, kind, baseline, plan.available
            )
    return plan


def framework_bytes(kind: str) -> int:
    """The framework's bytes: CUDA a constant; CPU this process's resident memory now (``VmRSS``)."""
    if kind == "cuda":
        return CUDA_FRAMEWORK_BYTES
    rss = _proc_status_kib("VmRSS")
    if rss is not None:
        return rss * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - neither /proc nor psutil
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def available_memory(kind: str) -> tuple[int, str] | None:
    """(bytes, how) the device has free now: CUDA ``mem_get_info``; CPU ``MemAvailable``."""
    if kind == "cuda":
        try:
            import torch

            free, _ = torch.cuda.mem_get_info()
            return int(free), "free on the GPU (torch.cuda.mem_get_info)"
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable + this process"
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM (psutil) + this process"
    except ImportError:
        return None


def _processes_here(world: int) -> int:
    """Processes sharing this machine's memory (torchrun's LOCAL_WORLD_SIZE), for CPU plans."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return max(1, int(local)) if local and local.isdigit() else (world if world > 1 else 1)


def _devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def _advice(cfg, facts, lengths, layout, world, kind, baseline, available) -> list[Advice]:
    """The cheapest changes, in order, each on top of the previous, until one fits."""
    steps: list[tuple[str, Any]] = []
    strategy = resolved_reference_strategy(cfg)
    if strategy == "copy" and cfg.reference.sync.mode == "none":
        steps.append(("reference.strategy=precomputed", _set("reference.strategy", "precomputed")))
    if not cfg.model.gradient_checkpointing:
        steps.append(
            ("model.gradient_checkpointing=true", _set("model.gradient_checkpointing", True))
        )
    steps.append(("micro-batch", None))
    devices = max(world, _devices() if kind == "cuda" else 1)
    if devices > 1 and cfg.train.parallel != "fsdp":
        steps.append(("train.parallel=fsdp", _set("train.parallel", "fsdp")))
    if not cfg.model.lora.enabled:
        steps.append(("model.lora.enabled=true", _set("model.lora.enabled", True)))
    out: list[Advice] = []
    current = copy.deepcopy(cfg)
    n_world = world

    def total(c) -> int:
        return _arithmetic(c, facts, lengths, layout, n_world, kind, baseline).total

    best = total(current)
    for change, apply in steps:
        before, world_before = current, n_world
        if change == "micro-batch":  # the largest divisor of the batch that fits (else 1)
            b, accum = current.train.batch_size, current.train.grad_accum
            if b <= 1:
                continue
            for size in [d for d in range(b - 1, 0, -1) if b % d == 0]:
                trial = copy.deepcopy(current)
                trial.train.batch_size, trial.train.grad_accum = size, accum * (b // size)
                if total(trial) <= available:
                    break
            current = trial
            change = f"train.batch_size={size} train.grad_accum={accum * (b // size)}"
        else:
            current = copy.deepcopy(current)
            apply(current)
            if change == "train.parallel=fsdp":
                n_world = devices
                change += f" ({devices} processes)"
        t = total(current)
        if t >= best:  # no saving here (e.g. LoRA when activations dominate): not advised
            current, n_world = before, world_before
            continue
        best = t
        out.append(Advice(change, t, t <= available))
        if t <= available:
            break
    return out


def _set(key: str, value):
    def apply(cfg) -> None:
        section, name = key.rsplit(".", 1)
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        setattr(obj, name, value)

    return apply
