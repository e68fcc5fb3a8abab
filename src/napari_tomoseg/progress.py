"""Progress events and cooperative stopping for long work.

Long work in the core is a *generator* that yields :class:`Progress` events and returns its
result.  napari's ``thread_worker`` runs such a generator in a thread and forwards the events
to the GUI; scripts and the CLI call :func:`drive`, which runs it to the end.  Stopping is
cooperative: the generator checks a ``should_stop`` callable between steps and finishes
cleanly (returning what it has), so no result is lost and no file is left half written.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

ProgressCallback = Callable[["Progress"], None]
StopCheck = Callable[[], bool]


@dataclass
class Progress:
    """One step of a long task: where it is and the numbers worth showing."""

    stage: str
    step: int
    total: int
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    payload: Any = None

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


def drive(gen: Generator[Progress, None, T], callback: ProgressCallback | None = None) -> T:
    """Run a progress generator to completion, passing each event to ``callback``."""
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            return done.value
        if callback is not None:
            callback(event)


def never_stop() -> bool:
    """Default ``should_stop``: never asks to stop."""
    return False
