"""What the server's parts report as they work: one observer interface, passed in at construction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.batch_call import BatchStats
    from service.jobs import Job
    from service.models import ModelEntry
    from service.requests import Event


class Observer:
    """Receives the server's events; every method is a no-op here, so a subclass overrides what it needs.

    Methods are called on the thread where the event happens (the device worker, a swap thread or the event
    loop): they must be quick, must not block and must not raise."""

    def request_finished(self, job: Job, event: Event) -> None:
        """A request reached its terminal event (a Result or a Failed); the ledger already has it."""

    def batch_ran(self, jobs: list[Job], stats: BatchStats) -> None:
        """One pipeline call ran for `jobs` (after its events were posted)."""

    def model_loaded(self, entry: ModelEntry, seconds: float) -> None:
        """A model's weights were loaded onto the device."""

    def swap_finished(self, alias: str, ok: bool) -> None:
        """A hot swap of `alias` finished: `ok` when the alias moved, False when it kept its model."""

    def prompt_cache_lookup(self, hit: bool) -> None:
        """The prompt-embedding cache was asked for a prompt's embeddings."""

    def adapter_lookup(self, hit: bool) -> None:
        """A batch needed a LoRA in a model: `hit` when it was loaded there already."""

    def adapter_evicted(self) -> None:
        """A LoRA was unloaded from a model to keep the adapter pool within its bytes."""

    def adapter_cache(self, nbytes: int, entries: int) -> None:
        """The adapter pool now holds `entries` LoRA loads of `nbytes` bytes in all."""

    def idle(self) -> None:
        """The last active request finished: nothing is queued or running."""

    def leases_renewed(self, slots: frozenset[str]) -> None:
        """The model manager accepted this server's leases on `slots` (stored-variant slot ids)."""


class Observers(Observer):
    """Fans every event out to several observers, in order."""

    def __init__(self, observers: Iterable[Observer] = ()):
        self._all = tuple(observers)

    def request_finished(self, job: Job, event: Event) -> None:
        for o in self._all:
            o.request_finished(job, event)

    def batch_ran(self, jobs: list[Job], stats: BatchStats) -> None:
        for o in self._all:
            o.batch_ran(jobs, stats)

    def model_loaded(self, entry: ModelEntry, seconds: float) -> None:
        for o in self._all:
            o.model_loaded(entry, seconds)

    def swap_finished(self, alias: str, ok: bool) -> None:
        for o in self._all:
            o.swap_finished(alias, ok)

    def prompt_cache_lookup(self, hit: bool) -> None:
        for o in self._all:
            o.prompt_cache_lookup(hit)

    def adapter_lookup(self, hit: bool) -> None:
        for o in self._all:
            o.adapter_lookup(hit)

    def adapter_evicted(self) -> None:
        for o in self._all:
            o.adapter_evicted()

    def adapter_cache(self, nbytes: int, entries: int) -> None:
        for o in self._all:
            o.adapter_cache(nbytes, entries)

    def idle(self) -> None:
        for o in self._all:
            o.idle()

    def leases_renewed(self, slots: frozenset[str]) -> None:
        for o in self._all:
            o.leases_renewed(slots)
