"""Per-stage wall-clock timing and progress lines with elapsed time."""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class StageTimes:
    """Seconds spent per stage name, one entry per call (CUDA work is synchronised before reading the clock)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str, device: torch.device | str = "cpu") -> Iterator[None]:
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.seconds[name].append(time.perf_counter() - start)

    def totals(self) -> dict[str, float]:
        """Total seconds per stage."""
        return {name: sum(values) for name, values in self.seconds.items()}

    def table(self) -> str:
        """A small text table: stage, calls, total and mean milliseconds."""
        rows = [f"{'stage':<14}{'calls':>6}{'total ms':>12}{'mean ms':>10}"]
        for name, values in self.seconds.items():
            rows.append(f"{name:<14}{len(values):>6}{1e3 * sum(values):>12.1f}{1e3 * sum(values) / len(values):>10.1f}")
        return "\n".join(rows)


@contextmanager
def progress(message: str) -> Iterator[None]:
    """Print `message ...` then `done in X.XXs` around a long piece of work."""
    start = time.perf_counter()
    print(f"{message} ...", file=sys.stderr, flush=True)
    yield
    print(f"  {message}: done in {time.perf_counter() - start:.2f}s", file=sys.stderr, flush=True)
