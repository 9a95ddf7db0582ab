"""Run a measurement on a thread of its own, as llamaq's engine loop runs llama.cpp.

Every system that calls llama.cpp in the benchmark's own process (the bare loop, `Llama` one at a time, the
engine) calls it from a thread other than the main one, so none differs from the others in that. Seen once on
this kind of machine under heavy load (load average about 9 on 2 cores), 2 llama.cpp threads: the bare loop's
decode step at 4 sequences took median 311 ms from the main thread and 96 ms from another thread, alternated 6
times (1 thread: 118 and 127 ms); at load 7 a repeat showed no difference (97 against 81 to 88 ms). Unexplained.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(run: Callable[[], T], name: str) -> T:
    """run() on a new thread; its result, or its exception raised here."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            outcome.append(run())
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, raised there
            failure.append(exc)

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
