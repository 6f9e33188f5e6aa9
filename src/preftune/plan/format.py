"""The plan as text: the table ``preftune plan`` prints and ``preftune train`` logs at its start."""

from __future__ import annotations

from preftune.plan.estimate import RSS, MemoryPlan
from preftune.plan.units import _gib


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table of lines (what ``preftune plan`` prints and ``train`` logs on rank 0)."""
    f = plan.facts
    layout = {"shared_prompt": "shared prompt", "padded": "padded rows"}[plan.layout]
    where = (
        plan.device
        if plan.parallel == "none"
        else f"{plan.device}, {plan.parallel} x {plan.world_size}"
    )
    lines = [
        f"memory plan per process ({where}, {plan.precision}): {f.describe()}",
        f"  layout {layout}{'' if plan.layout_known else ' (predicted; the setup probe decides)'}, "
        f"reference {plan.reference}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
        f"{', LoRA' if plan.lora else ''}",
        f"  longest micro-batch: {plan.batch.describe()} ({plan.batch.source})",
    ]
    width = max(len(it.name) for it in plan.items)
    for it in plan.items:
        lines.append(f"  {it.name:<{width}}  {_gib(it.bytes):>7} GiB  {it.when:<14}  {it.how}")
    formula = "held + max(backward start, backward end)"
    if any(it.when == RSS for it in plan.items):
        formula += " + allocator"
    lines.append(f"  {'peak':<{width}}  {_gib(plan.total):>7} GiB  " + _phases(plan, formula))
    if plan.available is not None:
        share = f" (1/{plan.processes_here} per process)" if plan.processes_here > 1 else ""
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        if plan.fits and plan.total > 0.9 * plan.available:
            verdict = "fits, tightly (over 90% of it)"
        lines.append(
            f"  {'available':<{width}}  {_gib(plan.available):>7} GiB  {plan.available_how}{share}: "
            f"{verdict}"
        )
    for note in plan.notes:
        lines.append(f"  note: {note}")
    if plan.advice:
        lines.append("  cheapest changes, in order (each on top of the previous):")
        for k, adv in enumerate(plan.advice, 1):
            lines.append(
                f"    {k}. {adv.change}  -> {_gib(adv.total)} GiB{'  fits' if adv.fits else ''}"
            )
        if not plan.advice[-1].fits:
            lines.append(
                "    even with all of them it does not fit: a larger device, or more of them"
            )
    return "\n".join(lines)


def _phases(plan: MemoryPlan, formula: str) -> str:
    top = max(plan.phases, key=plan.phases.__getitem__)
    others = ", ".join(f"{k} {_gib(v)}" for k, v in plan.phases.items() if k != top)
    what = f"training step: {formula}" if top == "train" else f"the {top} phase"
    return f"{what}; other phases: {others} GiB" if others else what
