"""The frozen listener: ListenerWorker (one vLLM engine) and ListenerPool (L of them, resizable live).

ListenerWorker reads the pair's prompt, both images and the reasoner's reasoning with the answer masked
(`pipeline.prompts.mask_answer`), and returns p(image 1) renormalised over the two answer tokens. Both
tokens' logprobs are always read, never guessed: vLLM's `logprob_token_ids` returns the raw logprob of
exactly those two tokens for the first generated position, wherever they rank (checked against
transformers in the integration test). A completion with no reasoning left after masking is not sent to
the engine: its score has `usable=False` and carries p = 0.5 only as a placeholder; the reward gives it no
listener credit and no listener metric reads it (`pipeline.rewards`).

ListenerPool is meant to run as a named async Ray actor (see `pipeline/placement.py`); the driver sends it
rollout groups as they finish and `python -m pipeline scale-listeners` calls `resize` on it by name.
- Load balancing and backpressure: a request goes to the ready worker with the fewest in flight, and a
  worker never holds more than `ListenerConfig.max_in_flight` requests; the rest wait in the pool's queue.
  Requests to one worker are sent as one batch (one engine call), split evenly over the free workers.
- `resize(L)`: new workers take requests once their engine is up; removed workers stop taking requests,
  finish what they hold, then are killed, so every request is answered exactly once. A growth waits at most
  its `timeout_s` for the new engines (on a cluster without room for them they never start): then it gives
  up the ones not up, releases the resize lock and says which resources the cluster lacked.
- `listener.autoscale.enabled`: every `interval_s` the pool resizes itself from the peak backlog (queued
  + in flight) it saw (`pipeline.autoscale.decide`); the engines it adds ask Ray for their resources, so on
  KubeRay the autoscaler adds listener pods, and removes them once the engines are gone. A manual resize
  (`scale_to`, `scale-listeners`) first makes a growth under way give way, then pins its size for
  `override_hold_s`; above `max_workers` it is refused.
- A worker that dies (`RayActorError`) is replaced, and the requests it held are queued again at the
  front (`retries` counts them); a request is given up (an error for its caller) after `max_attempts`.
- Each worker asks for one unit of the pool's own Ray custom resource (`ListenerConfig.resource`), so a
  cluster scales the listener group alone; the pool actor itself is a dispatcher and needs no CPU.

Integration test: `pytest -m integration tests/integration/test_listener.py`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from actors.engine import build_engine, intra_op_threads
from pipeline.config import EngineConfig, ListenerConfig
from pipeline.prompts import LISTENER_ANSWER_TOKENS, listener_p_image_1, listener_prompt, mask_answer
from pipeline.autoscale import AutoscaleClock, decide, missing_for, worker_bundle
from pipeline.types import ListenerPoolStats, ListenerRequest, ListenerScore, ResizeResult, RolloutGroup

logger = logging.getLogger(__name__)
UNUSABLE_P = 0.5  # the placeholder p of an unusable score (nothing left after masking); never a reward


class ListenerWorker:
    """One frozen listener engine; never receives weights."""

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0, num_threads: int = 1,
                 mm_processor_kwargs: dict | None = None, trust_remote_code: bool = False) -> None:
        self._llm = build_engine(model_path, engine, seed, num_threads=num_threads,  # prefill only: no graphs
                                 mm_processor_kwargs=mm_processor_kwargs, trust_remote_code=trust_remote_code,
                                 cuda_graphs=False)
        self._answer_ids = answer_token_ids(self._llm.get_tokenizer())

    def ready(self) -> bool:
        return True

    def score(self, requests: list[ListenerRequest]) -> list[ListenerScore]:
        """One score per request, in order; one engine call for all the usable ones."""
        from vllm import SamplingParams

        masked = [mask_answer(r.text) for r in requests]
        usable = [i for i, reasoning in enumerate(masked) if reasoning]
        prompts = [{"prompt": listener_prompt(requests[i].pair.prompt, masked[i]),
                    "multi_modal_data": {"image": [requests[i].pair.image_1, requests[i].pair.image_2]}}
                   for i in usable]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(self._answer_ids))
        outputs = self._llm.generate(prompts, params, use_tqdm=False) if prompts else []
        p_image_1 = {i: self._p_image_1(output) for i, output in zip(usable, outputs, strict=True)}
        return [make_score(r, p_image_1.get(i, UNUSABLE_P), usable=i in p_image_1) for i, r in enumerate(requests)]

    def _p_image_1(self, output: Any) -> float:
        first = output.outputs[0].logprobs[0]  # token id -> Logprob at the first generated position
        missing = [t for t in self._answer_ids if t not in first]
        if missing:
            raise RuntimeError(f"engine returned no logprob for answer token ids {missing}")
        return listener_p_image_1(first[self._answer_ids[0]].logprob, first[self._answer_ids[1]].logprob)


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The single-token ids of the listener's answers for image 1 and image 2."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in LISTENER_ANSWER_TOKENS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"listener answers {LISTENER_ANSWER_TOKENS} must be single tokens, got {ids}")
    return ids[0][0], ids[1][0]


def make_score(request: ListenerRequest, p_image_1: float, usable: bool = True) -> ListenerScore:
    """The score of one request from the listener's p(image 1): p(preferred) is p(image 1) when the pair's
    preferred image is 1, else 1 - p(image 1) (pure; tested by hand for both labels in tests/unit)."""
    p_preferred = p_image_1 if request.pair.preferred == 1 else 1.0 - p_image_1
    return ListenerScore(pair_id=request.pair.pair_id, completion_index=request.completion_index,
                         p_image_1=float(p_image_1), p_preferred=float(p_preferred), usable=usable)


def requests_of(groups: list[RolloutGroup]) -> list[ListenerRequest]:
    """Every completion of every group, group by group, in completion order."""
    return [ListenerRequest(pair=g.pair, completion_index=c.completion_index, text=c.text)
            for g in groups for c in g.completions]


def default_worker_options(listener: ListenerConfig) -> dict[str, Any]:
    """Ray options of one ListenerWorker: its CPUs/GPUs and one unit of the pool's own resource."""
    return {"num_cpus": listener.num_cpus, "num_gpus": listener.num_gpus, "resources": {listener.resource: 1}}


# ---- the pool ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Item:
    request: ListenerRequest
    future: asyncio.Future
    attempts: int = 0
    t_queued: float = field(default_factory=time.monotonic)  # scoring latency runs from here to the answer


@dataclass(eq=False)
class _Slot:
    """One worker position; its actor is replaced (generation + 1) when it dies."""

    actor: Any
    generation: int = 0
    ready: bool = False
    retiring: bool = False
    start_failures: int = 0
    in_flight: set[_Item] = field(default_factory=set)


class ListenerPool:
    """Dispatches score requests over L ListenerWorker actors. Run it as an async Ray actor."""

    def __init__(self, model_path: str, listener: ListenerConfig, worker_options: dict[str, Any] | None = None,
                 seed: int = 0, mm_processor_kwargs: dict | None = None, max_attempts: int = 3,
                 max_start_failures: int = 3, trust_remote_code: bool = False) -> None:
        self._model_path = str(model_path)
        self._trust_remote_code = trust_remote_code
        self._cfg = listener
        self._options = dict(worker_options or default_worker_options(listener))
        self._seed = seed
        self._mm_kwargs = mm_processor_kwargs
        self._max_attempts = max_attempts
        self._max_start_failures = max_start_failures
        self._queue: collections.deque[_Item] = collections.deque()
        self._counts: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task] = set()  # strong references to running tasks
        self._unwatched: list[_Slot] = []  # readiness is awaited once an event loop runs (first async call)
        self._spawned = 0
        self._target = listener.num_workers
        self._resize_lock: asyncio.Lock | None = None
        self._clock = AutoscaleClock()
        self._autoscaling = False  # the autoscale task runs (started with the event loop)
        self._pinned_until = 0.0  # monotonic time before which autoscaling leaves the size alone
        self._overrides_waiting = 0  # manual resizes waiting for the lock: a growth under way gives way
        self._tick_peak = self._step_peak = 0  # peak backlog since the last autoscale check / metrics()
        self._step_latencies: list[float] = []  # scoring latencies since the last metrics()
        self._slots = [self._new_slot() for _ in range(listener.num_workers)]  # engines start now

    # ---- public API (all async: the actor's event loop is the only thread touching the state) ----------

    async def ready(self) -> bool:
        """Wait until every worker's engine is up."""
        self._start()
        await self._wait_for(lambda: all(s.ready for s in self._slots if not s.retiring))
        return True

    async def score(self, groups: list[RolloutGroup]) -> list[ListenerScore]:
        """Scores of every completion of `groups`, group by group, in completion order."""
        return await self.score_requests(requests_of(groups))

    async def score_requests(self, requests: list[ListenerRequest]) -> list[ListenerScore]:
        """One score per request, in order; waits in the queue while every worker is full."""
        self._start()
        if not self._slots:  # every worker failed to start: nothing would ever take these requests
            raise RuntimeError("the listener pool has no workers left (they failed to start)")
        loop = asyncio.get_running_loop()
        items = [_Item(request=r, future=loop.create_future()) for r in requests]
        self._queue.extend(items)
        backlog = len(self._queue) + sum(len(s.in_flight) for s in self._slots)
        self._tick_peak, self._step_peak = max(self._tick_peak, backlog), max(self._step_peak, backlog)
        self._pump()
        return list(await asyncio.gather(*(item.future for item in items)))

    async def resize(self, num_workers: int, timeout_s: float | None = None) -> int:
        """Grow or shrink to `num_workers` while requests flow; returns the number serving once it does
        (fewer if a new engine never started, or was not up in time: see `scale_to`)."""
        return (await self.scale_to(num_workers, timeout_s)).serving

    async def scale_to(self, num_workers: int, timeout_s: float | None = None) -> ResizeResult:
        """A manual resize (`scale-listeners`), done within `timeout_s` (default `autoscale.resize_timeout_s`;
        waiting for the lock included). A growth still waiting for its engines gives way to it. Above
        `autoscale.max_workers` it is refused when autoscaling; else it pins the size for `override_hold_s`."""
        rule = self._cfg.autoscale
        if num_workers < 1:
            raise ValueError(f"a listener pool needs at least one worker, got {num_workers}")
        if rule.enabled and num_workers > rule.max_workers:
            raise ValueError(f"asked for {num_workers} listener workers, above listener.autoscale.max_workers="
                             f"{rule.max_workers} (keep it <= the KubeRay listener group's maxReplicas)")
        self._start()
        timeout_s = rule.resize_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self._overrides_waiting += 1  # a growth waiting for its engines stops waiting
        try:
            acquired = await _acquire(self._resize_lock, deadline)
        finally:
            self._overrides_waiting -= 1
        if not acquired:
            serving = self._serving()
            return ResizeResult(num_workers, serving, serving, f"another resize of the listener pool held it for "
                                f"the whole {timeout_s:g} s timeout; nothing changed")
        try:
            result = await self._resize_locked(num_workers, deadline)
        finally:
            self._resize_lock.release()
        if rule.enabled:
            self._pinned_until = time.monotonic() + rule.override_hold_s
            self._clock.last_change_s = time.monotonic()
            result = replace(result, hold_s=rule.override_hold_s)
        return result

    async def stats(self) -> ListenerPoolStats:
        serving = [s for s in self._slots if not s.retiring]
        return ListenerPoolStats(
            num_workers=self._target, ready_workers=sum(s.ready for s in serving), queued=len(self._queue),
            in_flight=sum(len(s.in_flight) for s in self._slots), completed=self._counts["completed"],
            retries=self._counts["retries"], restarts=self._counts["restarts"], failed=self._counts["failed"])

    async def metrics(self) -> dict[str, float]:
        """`stats()` flattened for MLflow (`listener/retries`, ...), and the load since the previous call (the
        driver calls it once per step): `listener/backlog_peak` (most requests queued or in flight at once),
        `listener/latency_mean_s` and `listener/latency_max_s` (queued -> answered; NaN when none was)."""
        latencies, self._step_latencies = self._step_latencies, []
        peak, self._step_peak = self._step_peak, len(self._queue) + sum(len(s.in_flight) for s in self._slots)
        mean = sum(latencies) / len(latencies) if latencies else math.nan
        return (await self.stats()).as_metrics() | {
            "listener/backlog_peak": float(peak), "listener/latency_mean_s": mean,
            "listener/latency_max_s": max(latencies, default=math.nan)}

    async def workers(self) -> list[Any]:
        """The current worker actor handles (operations and tests)."""
        return [s.actor for s in self._slots if not s.retiring]

    async def shutdown(self) -> None:
        import ray

        for slot in self._slots:
            ray.kill(slot.actor, no_restart=True)
        self._slots = []
        self._fail_queued(RuntimeError("listener pool shut down"))

    # ---- workers --------------------------------------------------------------------------------------

    def _spawn(self) -> Any:
        import ray

        self._spawned += 1
        return ray.remote(ListenerWorker).options(**self._options).remote(
            self._model_path, self._cfg.engine, seed=self._seed + self._spawned - 1,
            num_threads=intra_op_threads(self._cfg.num_cpus), mm_processor_kwargs=self._mm_kwargs,
            trust_remote_code=self._trust_remote_code)

    def _new_slot(self) -> _Slot:
        slot = _Slot(actor=self._spawn())
        self._unwatched.append(slot)
        return slot

    def _start(self) -> None:
        """Begin awaiting the readiness of new engines, and autoscaling (needs the running event loop)."""
        if self._resize_lock is None:
            self._resize_lock = asyncio.Lock()
        if self._cfg.autoscale.enabled and not self._autoscaling:
            self._autoscaling = True
            self._run_task(self._autoscale())
        while self._unwatched:
            slot = self._unwatched.pop()
            self._run_task(self._await_ready(slot, slot.generation))

    async def _await_ready(self, slot: _Slot, generation: int) -> None:
        try:
            await slot.actor.ready.remote()
        except Exception as exc:  # the engine failed to start, or the actor died while starting
            if slot.generation != generation or slot.retiring or slot not in self._slots:
                return
            slot.start_failures += 1
            logger.warning("listener worker failed to start (%d): %s", slot.start_failures, exc)
            if slot.start_failures < self._max_start_failures:
                self._restart(slot)
            else:
                self._slots.remove(slot)
                if not self._slots:
                    self._fail_queued(RuntimeError(f"no listener worker could start: {exc}"))
            return
        if slot.generation == generation:
            slot.ready, slot.start_failures = True, 0
            self._pump()

    def _restart(self, slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        slot.actor, slot.generation, slot.ready = self._spawn(), slot.generation + 1, False
        self._counts["restarts"] += 1
        self._unwatched.append(slot)
        self._start()

    def _serving(self) -> int:
        return sum(not s.retiring for s in self._slots)

    async def _resize_locked(self, num_workers: int, deadline: float, autoscaling: bool = False) -> ResizeResult:
        """Resize with the lock held; a growth gives up its engines not up by `deadline`, or as soon as a
        manual resize waits for the lock."""
        active = [s for s in self._slots if not s.retiring]
        error, self._target = "", num_workers  # `stats().num_workers` says what the pool is moving to
        if num_workers > len(active):
            error = await self._grow(num_workers - len(active), deadline, autoscaling)
        elif num_workers < len(active):
            await self._shrink(active, len(active) - num_workers)
        serving = self._serving()  # fewer if a new engine never started
        self._target = serving if error else num_workers
        logger.info("listener pool resized to %d workers (asked for %d%s)%s", serving, num_workers,
                    ", autoscaling" if autoscaling else "", f": {error}" if error else "")
        return ResizeResult(asked=num_workers, before=len(active), serving=serving, error=error)

    async def _grow(self, count: int, deadline: float, autoscaling: bool) -> str:
        """Start `count` engines and wait for them until `deadline` or until a manual resize asks for the
        lock; the ones not up by then are given up. Returns "" or one line why."""
        import ray

        new = [self._new_slot() for _ in range(count)]
        self._slots.extend(new)
        self._start()
        t_start = time.monotonic()
        up = lambda: all(s.ready or s not in self._slots for s in new)  # noqa: E731
        if await self._wait_for(lambda: up() or self._overrides_waiting > 0, deadline) and up():
            return ""
        late = [s for s in new if s in self._slots and not s.ready]
        missing = missing_for(worker_bundle(self._options), len(late), ray.available_resources())
        for slot in late:  # killing an actor still waiting for resources withdraws its demand
            self._slots.remove(slot)
            ray.kill(slot.actor, no_restart=True)
        gave_way = self._overrides_waiting > 0
        if autoscaling and gave_way:
            return ""  # a manual resize sets the size next
        lacks = ", ".join(f"{name} (needs {need:g}, {free:g} free)" for name, (need, free) in missing.items())
        why = (f"the cluster lacks {lacks}; on KubeRay check the listener group's maxReplicas and that its pods "
               f"fit a node" if missing else "their engines were still loading")
        when = "before a later resize came" if gave_way else f"within {time.monotonic() - t_start:.0f} s"
        return f"{len(late)} of {count} new listener workers were not up {when} ({why}); gave them up"

    async def _autoscale(self) -> None:
        """Every `interval_s`: resize to `pipeline.autoscale.decide` of the peak backlog since the last check,
        unless a manual resize pinned the size or holds the lock."""
        rule = self._cfg.autoscale
        while True:
            await asyncio.sleep(rule.interval_s)
            if not self._slots:  # shut down, or no worker could start
                return
            peak = self._tick_peak
            self._tick_peak = len(self._queue) + sum(len(s.in_flight) for s in self._slots)
            now = time.monotonic()
            if now < self._pinned_until or self._resize_lock.locked():
                continue
            wanted = decide(now, self._serving(), peak, rule, self._clock)
            if wanted == self._serving():
                continue
            try:
                async with self._resize_lock:
                    if time.monotonic() >= self._pinned_until:  # a manual resize may have come meanwhile
                        await self._resize_locked(wanted, now + rule.resize_timeout_s, autoscaling=True)
            except Exception as exc:  # noqa: BLE001 - the pool keeps serving at its size; the next tick retries
                logger.warning("listener autoscaling to %d workers failed: %s", wanted, exc)
            self._clock.last_change_s = time.monotonic()

    async def _shrink(self, active: list[_Slot], count: int) -> None:
        import ray

        # Retire starting workers first, then the least loaded; they finish what they hold, take nothing new.
        victims = sorted(active, key=lambda s: (s.ready, len(s.in_flight)))[:count]
        for slot in victims:
            slot.retiring = True
        await self._wait_for(lambda: all(not s.in_flight for s in victims))
        for slot in victims:
            self._slots.remove(slot)
            ray.kill(slot.actor, no_restart=True)

    # ---- dispatch -------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send queued requests to ready workers with room, fewest in flight first, split evenly."""
        cap = self._cfg.max_in_flight
        while self._queue:
            free = [s for s in self._slots if s.ready and not s.retiring and len(s.in_flight) < cap]
            if not free:
                return
            slot = min(free, key=lambda s: len(s.in_flight))
            size = min(cap - len(slot.in_flight), -(-len(self._queue) // len(free)))
            batch = [item for item in (self._queue.popleft() for _ in range(size)) if not item.future.done()]
            if batch:
                slot.in_flight.update(batch)
                self._run_task(self._send(slot, slot.generation, batch))

    async def _send(self, slot: _Slot, generation: int, batch: list[_Item]) -> None:
        import ray

        try:
            scores = await slot.actor.score.remote([item.request for item in batch])
        except ray.exceptions.RayActorError as exc:  # the worker died: retry elsewhere, replace it
            self._requeue(batch, exc)
            if slot.generation == generation and not slot.retiring and slot in self._slots:
                logger.warning("listener worker died; restarting it: %s", exc)
                self._restart(slot)
        except Exception as exc:  # the worker raised on these requests: report, do not retry
            self._counts["failed"] += len(batch)
            for item in batch:
                _resolve(item, exc=exc)
        else:
            now = time.monotonic()
            for item, score in zip(batch, scores, strict=True):
                answered = _resolve(item, result=score)
                self._counts["completed"] += answered
                if answered:
                    self._step_latencies.append(now - item.t_queued)
        finally:
            slot.in_flight.difference_update(batch)
            self._pump()

    def _requeue(self, batch: list[_Item], exc: Exception) -> None:
        again = []
        for item in batch:
            item.attempts += 1
            if item.attempts < self._max_attempts:
                again.append(item)
            else:
                self._counts["failed"] += _resolve(item, exc=RuntimeError(
                    f"listener request {item.request.pair.pair_id}/{item.request.completion_index} lost "
                    f"its worker {item.attempts} times: {exc}"))
        self._counts["retries"] += len(again)
        self._queue.extendleft(reversed(again))  # in front: they waited longest

    def _fail_queued(self, exc: Exception) -> None:
        while self._queue:
            self._counts["failed"] += _resolve(self._queue.popleft(), exc=exc)

    def _run_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_for(self, predicate: Any, deadline: float = math.inf, poll_s: float = 0.05) -> bool:
        """True once `predicate()` holds, False at `deadline` (time.monotonic)."""
        while True:  # no slot left is checked first: `all()` over no workers would read as "all ready"
            if not self._slots:
                raise RuntimeError("the listener pool has no workers left (they failed to start)")
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)


async def _acquire(lock: asyncio.Lock, deadline: float, poll_s: float = 0.05) -> bool:
    """Take `lock` by `deadline` (time.monotonic); False if it stayed held. Polled, so nothing ever queues on
    the lock: `acquire()` on a free lock with no waiter takes it without suspending (no timeout can cancel
    an acquire that already took it)."""
    while lock.locked():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    await lock.acquire()
    return True


def _resolve(item: _Item, result: ListenerScore | None = None, exc: Exception | None = None) -> int:
    """Answer a request once; returns 1 if this call answered it (a cancelled caller's is skipped)."""
    if item.future.done():
        return 0
    if exc is not None:
        item.future.set_exception(exc)
    else:
        item.future.set_result(result)
    return 1
