"""The states a checkpoint holds besides its files' layout: every random generator a training step may draw
from (captured at save, restored last at load), and what training changes in a model (the whole state dict,
or with LoRA only the adapters). Moved out of :mod:`preftune.checkpoint`, which imports everything here and
is where to import from.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.checkpoint_files import CheckpointError

__all__ = ["capture_rng_state", "restore_rng_state"]

# ---------------------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every generator a training step may draw from (python, numpy, torch CPU, CUDA).

    The numpy state is stored as plain Python/torch values so that ``torch.load(weights_only=True)`` reads
    it back (raw numpy arrays are not on the safe-unpickling allow-list).
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(d: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only when CUDA is available."""
    if "python" in d:
        version, internal, gauss = d["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in d:
        n = d["numpy"]
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
    if "torch" in d:
        torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():
        states = d["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # a different number of visible GPUs: restore what matches
            for i, s in enumerate(states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------------
# What training changes


def _changing_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the whole state dict, or with LoRA (a PEFT model) only the adapters — the
    frozen base is ``model.path``'s and is loaded from there on resume (a 20 MB checkpoint, not 500 MB)."""
    state = model.state_dict()
    if getattr(model, "peft_config", None) is None:
        return state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def _load_changing_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path
) -> None:
    if getattr(model, "peft_config", None) is None:
        model.load_state_dict(state, strict=True)
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise CheckpointError(
            f"{path}: its adapter weights do not match this model's trainable parameters "
            f"({len(set(state) ^ trainable)} differ: other LoRA settings?)"
        )
    model.load_state_dict(state, strict=False)
