"""The training progress bar: step, mean train/test accuracy, models grokked (rich on a terminal, a plain
line every PLAIN_EVERY_S seconds elsewhere)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from fastgrok.core.step import EVAL_METRICS

if TYPE_CHECKING:
    from fastgrok.train.state import Records

I_TRAIN_ACC, I_TEST_ACC = EVAL_METRICS.index("train_acc"), EVAL_METRICS.index("test_acc")


class ProgressBar:
    """Progress: step, mean train/test accuracy, models grokked. A rich bar on a terminal; elsewhere (a log
    file, nohup) one plain line per PLAIN_EVERY_S seconds, at evaluation steps."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, total: int, n_models: int, enabled: bool):
        self.enabled, self.n, self.total = enabled, n_models, total
        self.live = False
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            console = Console()
            self.live = console.is_terminal
            if self.live:                           # on a narrow terminal (80 columns): no elapsed time, a short bar
                wide = console.width >= 110
                cols = [TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=40 if wide else 10)]
                cols += [TimeElapsedColumn()] if wide else []
                self.p = Progress(*cols, TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
                self.task = self.p.add_task("train", total=total, info="")
        self.last = 0.0
        self.t0 = time.monotonic()
        self.last_plain = self.t0

    def __enter__(self):
        if self.live:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.p.__exit__(*exc)

    def note(self, msg: str) -> None:
        if self.live:
            self.p.console.print(msg)
        elif self.enabled:
            print(msg, flush=True)

    def finish(self, step: int, records: Records, why: str) -> None:
        """A closing line: where the run ended and why (an early stop leaves the bar short of the budget)."""
        if not self.enabled:
            return
        msg = (f"done at step {step}/{self.total} ({why}): grokked {(records.t_grok >= 0).sum()}/{self.n}"
               + (f", diverged {records.diverged.sum()}" if records.diverged.any() else "")
               + f" ({time.monotonic() - self.t0:.0f} s)")
        if self.live:
            self.p.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def update(self, step: int, records: Records | None) -> None:
        if not self.enabled:
            return
        info = ""
        if records is not None:
            ev = records.evals[-1]
            info = (f"train {np.nanmean(ev[:, I_TRAIN_ACC]):.3f}  test {np.nanmean(ev[:, I_TEST_ACC]):.3f}  "
                    f"grokked {(records.t_grok >= 0).sum()}/{self.n}"
                    + (f"  diverged {records.diverged.sum()}" if records.diverged.any() else ""))
        now = time.monotonic()
        if not self.live:
            if records is not None and now - self.last_plain >= self.PLAIN_EVERY_S:
                print(f"step {step}/{self.total}  {info}  ({now - self.t0:.0f} s)", flush=True)
                self.last_plain = now
            return
        if records is not None or now - self.last > 0.2:
            self.p.update(self.task, completed=step, **({"info": info} if info else {}))
            self.last = now
