"""Runs blocking torch work on a short-lived thread so no idle thread keeps its own OpenMP team alive."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_in_fresh_thread(fn: Callable[[], T], name: str) -> T:
    """Awaits fn() run on a new thread that exits afterwards.

    asyncio.to_thread's pool threads stay alive; a pool thread that ran torch keeps an OpenMP thread team,
    and two teams on a small CPU stop libgomp's spin-waiting, which measured ~2x slower denoising steps on
    the worker thread (2-core VM). A thread that exits releases its team.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # delivered to the awaiting coroutine
            loop.call_soon_threadsafe(_set_exception, future, exc)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[T], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
