"""Run a measurement on a thread of its own, as llamaq's engine loop runs llama.cpp.

Measured on this kind of machine while it was loaded, with 2 llama.cpp threads: llama_decode called from the
process's main thread took 3 to 8 times as long as the same call from another thread (with 1 thread, no
difference). So every system that calls llama.cpp in the benchmark's own process (the bare loop, `Llama` one at
a time, the engine) calls it from a thread other than the main one.
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
