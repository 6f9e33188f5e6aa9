"""The built-in offline demo: a tiny addition model, its own samples judged into pairs, DPO on them.

Pieces (the demo runner wires them to the normal trainer):

- :mod:`~preftune.demo.task`: prompts ``"a+b="``, the judge/reward, the train/held-out split.
- :mod:`~preftune.demo.tokenizer`: the character-level tokenizer (a normal Hugging Face tokenizer folder).
- :mod:`~preftune.demo.build_base`: random-init tiny Llama, supervised on the task, stopped while imperfect.
- :mod:`~preftune.demo.sampling`: batched generation from a model folder.
- :mod:`~preftune.demo.pairs`: sample the base model's own answers, judge them, write preference JSONL.
- :mod:`~preftune.demo.evaluate`: task reward, sampled KL to the reference, implicit-reward accuracy.

The shipped base model lives in ``base_model/`` (:data:`BASE_MODEL_DIR`, ~2 MB, with
``preftune_demo.json`` recording its settings and accuracy). Rebuild it (about 1–2 minutes on 2 cores):

    python -m preftune.demo.build_base --out src/preftune/demo/base_model --seed 0

:func:`run_demo` (:mod:`~preftune.demo.runner`) runs the whole demo; its training config is ``demo.yaml``.
"""

from pathlib import Path

__all__ = ["BASE_MODEL_DIR", "run_demo"]

BASE_MODEL_DIR = Path(__file__).parent / "base_model"
"""The shipped base model folder (loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``)."""


def __getattr__(name: str):
    if name == "run_demo":  # lazily, so that importing the demo's pieces does not import the runner
        from preftune.demo.runner import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
