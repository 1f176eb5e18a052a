"""Per-stage timing (CUDA events on a GPU, perf_counter on the CPU) and progress lines with elapsed time."""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


class StageTimes:
    """Seconds spent per stage name, one entry per call.

    On a CUDA device a call records a start and an end event on the current stream and never waits for the host:
    the denoising loop stays free of synchronisation. The events are read (after one synchronisation) when
    `seconds` is. On the CPU a call reads perf_counter around itself.
    """

    def __init__(self) -> None:
        self.measured: dict[str, list[float]] = defaultdict(list)  # seconds read so far (CPU clock or CUDA events)
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str, device: torch.device | str = "cpu") -> Iterator[None]:
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
            return
        start_s = time.perf_counter()
        yield
        self.measured[name].append(time.perf_counter() - start_s)

    @property
    def seconds(self) -> dict[str, list[float]]:
        """Seconds of each call per stage, in call order (waits once for the recorded CUDA events)."""
        if self.events:
            torch.cuda.synchronize()
            for name, pairs in self.events.items():
                self.measured[name].extend(start.elapsed_time(end) / 1e3 for start, end in pairs)
            self.events.clear()
        return self.measured

    def totals(self) -> dict[str, float]:
        """Total seconds per stage."""
        return {name: sum(values) for name, values in self.seconds.items()}

    def table(self) -> str:
        """A small text table: stage, calls, total and mean milliseconds."""
        rows = [f"{'stage':<14}{'calls':>6}{'total ms':>12}{'mean ms':>10}"]
        for name, values in self.seconds.items():
            rows.append(f"{name:<14}{len(values):>6}{1e3 * sum(values):>12.1f}{1e3 * sum(values) / len(values):>10.1f}")
        return "\n".join(rows)


QUIET = {"on": False}  # the CLI's --quiet: no progress lines, notes, bars or announcements (errors and results stay)


def set_quiet(quiet: bool) -> None:
    """Switch progress output off (--quiet) or back on."""
    QUIET["on"] = quiet


def is_quiet() -> bool:
    """Whether progress output is off (--quiet)."""
    return QUIET["on"]


def note(message: str) -> None:
    """One progress or notice line on stderr (a stage up to date, a component written, a hint); nothing under
    --quiet. Warnings a user must see even then go through logging instead."""
    if not QUIET["on"]:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def progress(message: str) -> Iterator[None]:
    """Print `message ...` then `done in X.XXs` around a long piece of work (nothing under --quiet)."""
    start = time.perf_counter()
    if not QUIET["on"]:
        print(f"{message} ...", file=sys.stderr, flush=True)
    yield
    if not QUIET["on"]:
        print(f"  {message}: done in {time.perf_counter() - start:.2f}s", file=sys.stderr, flush=True)


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar over `iterable` on stderr with elapsed time and rate; off under --quiet and when stderr
    is not a terminal (logs and CI stay clean)."""
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                     disable=True if QUIET["on"] else None, dynamic_ncols=True))


def announce(message: str) -> None:
    """One line on stderr for a choice made on the user's behalf, shown where bars are (a terminal, not --quiet)."""
    if not QUIET["on"] and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
