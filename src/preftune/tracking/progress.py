"""The progress bar over optimizer steps."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from preftune.tracking._files import TOKS_KEYS as _TOKS_KEYS
from preftune.tracking._files import _first, _fmt, _scalar


class ProgressBar:
    """A tqdm bar over optimizer steps with loss, reward accuracy, margin and tokens/s.

    Set the postfix at log steps only (``update(1, loss=...)`` or :meth:`set_postfix`): formatting every step
    costs time. :meth:`write` prints through ``tqdm.write`` so log lines do not break the bar; with
    ``enabled=False`` there is no bar but lines still print; ``is_main=False`` silences both.
    """

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, *, is_main: bool = True
    ) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.is_main = is_main
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not (enabled and is_main),
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance ``n`` steps; keyword values (``loss``, ``acc``, ``margin``, ``tok_s``) set the postfix."""
        self.bar.update(n)
        if postfix:
            self._show({k.replace("tok_s", "tok/s"): v for k, v in postfix.items()})

    def set_postfix(self, metrics: Mapping[str, Any]) -> None:
        """Show loss, accuracy, margin and tok/s picked from a metrics row."""
        picks = {
            "loss": metrics.get("loss"),
            "acc": metrics.get("rewards/accuracies"),
            "margin": metrics.get("rewards/margins"),
            "tok/s": _first(metrics, _TOKS_KEYS),
        }
        self._show({k: v for k, v in picks.items() if v is not None})

    def write(self, msg: str) -> None:
        if self.is_main:
            self._tqdm.write(msg, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _show(self, values: Mapping[str, Any]) -> None:
        specs = {"loss": ".4f", "acc": ".2f", "margin": ".3g", "tok/s": ".0f"}
        shown = {k: _fmt(_scalar(v), specs.get(k, ".4g")) for k, v in values.items()}
        self.bar.set_postfix(shown, refresh=True)
