"""The plan at the start of a training run, for the trainer: never raises."""

from __future__ import annotations

import logging

from preftune.config import Config
from preftune.plan.advice import plan_memory
from preftune.plan.facts import facts_from_model, lengths_of
from preftune.plan.format import format_plan
from preftune.plan.units import _line

log = logging.getLogger("preftune.plan")  # the name the module had before the package


def plan_for_run(cfg: Config, data=None, dist=None, layout=None, model=None) -> str | None:
    """The plan's text for the start of a run (rank 0), or None when it cannot be made (logged, never
    raised: the plan must not stop a run). ``data``: the run's PreferenceData; ``dist``: its DistContext;
    ``layout``: the run's Layout once chosen; ``model``: an in-memory model given instead of
    ``model.path`` (its parameters are counted as they are)."""
    try:
        lengths = lengths_of(data.train) if data is not None else None
        world = dist.world_size if dist is not None else None
        device = dist.device.type if dist is not None else None
        name = getattr(layout, "name", layout)
        facts = facts_from_model(model, lora=cfg.model.lora) if model is not None else None
        plan = plan_memory(
            cfg, facts=facts, lengths=lengths, world_size=world, device=device, layout=name
        )
        return format_plan(plan)
    except Exception as e:  # a plan is advice: any failure is one log line
        log.warning("memory plan: not available (%s)", _line(e))
        return None
