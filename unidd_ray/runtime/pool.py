"""An elastic pool of Ray actors working through a queue of units, surviving the death of any of them.

Actors join the pool once their constructor has run (one that can never be placed, e.g. after its node was
removed, simply never joins).  Each idle actor takes the next unit; a unit whose actor died goes back to the
front of the queue for another actor (at most ``max_retries`` times), and the dead actor is replaced.  The
results come back in the order units finish; what they mean, and in which order they are combined, is the
caller's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class ElasticPool:
    """``size`` actors made by ``make_actor()`` (each with a ``ready()`` method) working through units.

    ``submit(actor, unit)`` starts a unit on an actor and returns its object ref.  ``max_retries``: how often a
    unit may be started again after its actor died; ``max_failed_starts``: how many actors may fail to start
    (beyond ``size``) before the pool gives up.
    """

    def __init__(self, make_actor: Callable[[], Any], size: int, submit: Callable[[Any, Hashable], Any], *,
                 max_retries: int, max_failed_starts: int):
        self.make_actor, self.size, self.submit = make_actor, size, submit
        self.max_retries, self.max_failed_starts = max_retries, max_failed_starts
        self.pool: dict[int, Any] = {}  # actor key -> handle, for actors that have started
        self.joining: dict = {}  # ready() ref -> handle, for actors starting
        self.in_flight: dict = {}  # unit ref -> (unit, actor key)
        self.queue: deque = deque()
        self.attempts: dict[Hashable, int] = {}
        self.retried = 0
        self.failed_starts = 0
        self._next_key = 0

    def run(self, units: list[Hashable], on_result: Callable[[Hashable, Any], None],
            after_unit: Callable[[Hashable, dict], None] | None = None) -> None:
        """Work through ``units``; ``on_result(unit, result)`` for each as it finishes, then
        ``after_unit(unit, actors)`` (tests use it to kill an actor or remove a node mid-run).  Every actor is
        killed when the run ends, however it ends."""
        self.queue.extend(units)
        self.attempts.update({u: 0 for u in units})
        for _ in range(self.size):
            self._start_actor()
        try:
            while self.queue or self.in_flight:
                self._dispatch()
                waiting = list(self.in_flight) + list(self.joining)
                if not waiting:
                    raise RuntimeError("no actor of the pool could be started; check the CPUs and GPUs each asks "
                                       "for against the cluster's resources")
                ready, _ = ray.wait(waiting, num_returns=1, timeout=None)
                ref = ready[0]
                if ref in self.joining:
                    self._join(ref)
                    continue
                unit, key = self.in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ACTOR_LOST:
                    self._requeue(unit)
                    self._replace(key)
                    continue
                on_result(unit, result)
                if after_unit is not None:
                    after_unit(unit, dict(self.pool))
        finally:
            for actor in list(self.pool.values()) + list(self.joining.values()):
                ray.kill(actor, no_restart=True)

    def _start_actor(self) -> None:
        actor = self.make_actor()
        self.joining[actor.ready.remote()] = actor

    def _join(self, ref) -> None:
        actor = self.joining.pop(ref)
        try:
            ray.get(ref)
        except ACTOR_LOST as exc:
            self.failed_starts += 1
            if self.failed_starts > self.max_failed_starts:
                raise RuntimeError(f"the pool's actors keep failing to start: {exc}") from exc
            self._start_actor()
            return
        self.pool[self._next_key] = actor
        self._next_key += 1

    def _dispatch(self) -> None:
        busy = {key for _, key in self.in_flight.values()}
        for key, actor in self.pool.items():
            if key in busy or not self.queue:
                continue
            unit = self.queue.popleft()
            self.in_flight[self.submit(actor, unit)] = (unit, key)

    def _requeue(self, unit: Hashable) -> None:
        self.attempts[unit] += 1
        if self.attempts[unit] > self.max_retries:
            raise RuntimeError(f"work unit {unit} failed {self.attempts[unit]} times; giving up")
        self.queue.appendleft(unit)
        self.retried += 1

    def _replace(self, key: int) -> None:
        """Requeue every other unit of the dead actor ``key``, kill it and start a replacement."""
        for ref, (unit, k) in list(self.in_flight.items()):
            if k == key:
                self.in_flight.pop(ref)
                self._requeue(unit)
        actor = self.pool.pop(key, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        self._start_actor()
