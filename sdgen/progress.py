"""Progress on stderr with rich: a line for the current stage, a bar for the images of a run and one for the
denoising steps of the UNet batch being computed (with it/s or s/it).

Shown only when stderr is a terminal and not ``--quiet``, so logs and pipes stay clean; when disabled every method
is a no-op, so callers never need to check. The display is transient: it disappears when the run ends, leaving
the terminal to the image paths and messages.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text
from rich.progress import Progress as RichProgress
from rich.progress import TimeRemainingColumn


class _Column(ProgressColumn):
    """Wraps a column so that it shows on bars only, not on the stage line (a task without a total)."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task):
        return Text("") if task.total is None else self.column(task)


class Task:
    """One bar; ``advance`` moves it, ``done`` removes it from the display. A no-op when progress is off."""

    def __init__(self, progress: RichProgress | None = None, task_id=None, show_rate: bool = False):
        self.progress, self.task_id, self.show_rate = progress, task_id, show_rate

    def advance(self, n: int = 1) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.task_id, n)
        if self.show_rate:
            self.progress.update(self.task_id, rate=_rate(self.progress.tasks[self._index()]))

    def done(self) -> None:
        if self.progress is not None:
            self.progress.remove_task(self.task_id)
            self.progress = None

    def _index(self) -> int:
        return next(i for i, t in enumerate(self.progress.tasks) if t.id == self.task_id)


def _rate(task) -> str:
    """it/s or s/it, whichever reads better, as the A1111 and diffusers bars show it."""
    if not task.elapsed or not task.completed:
        return ""
    per_step = task.elapsed / task.completed
    return f"{1 / per_step:.2f} it/s" if per_step < 1 else f"{per_step:.2f} s/it"


class Progress:
    """The progress display of one command; use as a context manager.

    >>> with Progress(quiet=quiet) as progress:
    ...     progress.status("loading toy")
    ...     images = progress.bar("images", total=6)
    ...     steps = progress.steps(20)         # replaces the previous steps bar
    ...     steps.advance(); images.advance()
    """

    def __init__(self, quiet: bool = False, stream=None):
        stream = stream or sys.stderr
        self.quiet = quiet
        self.enabled = not quiet and _isatty(stream)
        self.stream = stream
        self.console = Console(file=stream, stderr=stream is sys.stderr)
        self._rich: RichProgress | None = None
        self._status = None
        self._steps: Task | None = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._rich = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), _Column(BarColumn()),
                _Column(MofNCompleteColumn()), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                _Column(TimeRemainingColumn()), console=self.console, transient=True,
                # stdout printed while the bars show goes above them, but only when it is this same terminal:
                # redirected stdout (image paths for a script) must stay on stdout
                redirect_stdout=_isatty(sys.stdout), redirect_stderr=True,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None

    def status(self, text: str) -> None:
        """Show the current stage (loading, encoding, decoding, saving, ...)."""
        if self._rich is None:
            return
        if self._status is None:
            self._status = self._rich.add_task(text, total=None, rate="")
        else:
            self._rich.update(self._status, description=text)

    def bar(self, description: str, total: int, show_rate: bool = False) -> Task:
        """A new bar of ``total`` units."""
        if self._rich is None:
            return Task()
        return Task(self._rich, self._rich.add_task(description, total=total, rate=""), show_rate)

    def steps(self, total: int, description: str = "denoising") -> Task:
        """The bar of the denoising steps, with its rate; a new one replaces the previous one."""
        if self._steps is not None:
            self._steps.done()
        self._steps = self.bar(description, total, show_rate=True)
        return self._steps

    def message(self, text: str) -> None:
        """An informational line on stderr, above the bars; nothing with ``quiet``."""
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        """A line on stderr, above the bars, even with ``quiet``."""
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
