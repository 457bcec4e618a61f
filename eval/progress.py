"""A progress bar over the evaluator's shards (rich), silent when not wanted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def shard_progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """Yields `advance()`, to call once per finished shard."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("scoring shards", total=total)
        yield lambda: bar.advance(task)
