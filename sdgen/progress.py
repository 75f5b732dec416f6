"""Progress on stderr with rich: a status line per stage and a bar for the denoising steps.

Shown only when stderr is a terminal and not --quiet, so batch jobs get clean logs.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class _Task:
    def __init__(self, progress: RichProgress | None, task_id=None):
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task_id, n)


class Progress:
    def __init__(self, enabled: bool = True):
        self.console = Console(stderr=True)
        self.enabled = enabled and sys.stderr.isatty()
        self._rich: RichProgress | None = None
        self._status = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def status(self, text: str) -> None:
        if self._rich is None:
            return
        if self._status is None:
            self._status = self._rich.add_task(text, total=None, rate="")
        else:
            self._rich.update(self._status, description=text)

    def steps(self, total: int, description: str = "denoising") -> _Task:
        if self._rich is None:
            return _Task(None)
        return _RateTask(self._rich, self._rich.add_task(description, total=total, rate=""))


class _RateTask(_Task):
    """Shows it/s or s/it, whichever reads better, as the A1111 and diffusers bars do."""

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task_id, n)
        task = self.progress.tasks[self.task_id]
        if task.elapsed and task.completed:
            per_step = task.elapsed / task.completed
            rate = f"{1 / per_step:.2f} it/s" if per_step < 1 else f"{per_step:.2f} s/it"
            self.progress.update(self.task_id, rate=rate)
