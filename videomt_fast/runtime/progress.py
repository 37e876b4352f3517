"""The progress line a long planning wait shows: one line on stderr, naming the shape and the phase.

Shown only when the wait passes :data:`DELAY_S` and stderr is a terminal (or ``verbose=True``; never with
``verbose=False``), so scripts, logs and tests see nothing.
"""

from __future__ import annotations

import math
import sys

DELAY_S = 2.0


class PlanProgress:
    """``progress(what, elapsed_s, budget_s)``: the phase now under way; :meth:`close` ends the line. Called
    again after :meth:`close` (a later phase of the same shape), it starts a new line."""

    def __init__(self, label: str, verbose: bool | None = None, stream=None, delay_s: float = DELAY_S):
        self.label = label
        self.delay_s = delay_s
        self.stream = stream or sys.stderr
        if verbose is None:
            isatty = getattr(self.stream, "isatty", None)
            verbose = bool(isatty and isatty())
        self.enabled = bool(verbose)
        self._bar = None

    def __call__(self, what: str, elapsed_s: float, budget_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            bounded = math.isfinite(budget_s)
            self._bar = tqdm(total=round(budget_s) if bounded else None, desc=self.label, unit="s",
                             delay=self.delay_s, file=self.stream, leave=False,
                             bar_format="{desc} ({n:.0f} of at most {total} s)" if bounded else "{desc} ({n:.0f} s)")
        self._bar.set_description_str(f"{self.label}: {what}", refresh=False)
        self._bar.n = round(elapsed_s) if self._bar.total is None else min(round(elapsed_s), self._bar.total)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
