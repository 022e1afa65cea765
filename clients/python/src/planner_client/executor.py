"""The executor: handlers registered per target, served from the planner's dispatch stream.

    executor = Executor(concurrency=4)

    @executor.tool("web_search")
    async def web_search(task: TaskMessage, ctx: TaskContext) -> str:
        ...

    executor.run("nats://127.0.0.1:4222")   # until SIGINT or SIGTERM

Consumers. Each handler gets its own durable pull consumer on `PLANNER_TASKS`, filtered to its
one subject `planner.task.<kind>.<target>` and named after it. A work-queue stream allows one
consumer per subject and no overlaps, so naming the consumer after the subject makes every
executor (in any process, in any language using the same name) that serves a target share
that target's queue, instead of failing to create a second consumer.

Concurrency. A semaphore of `concurrency` slots bounds the dispatches this executor holds:
a handler's fetch loop takes a slot before it fetches one message, and the slot goes back when
the attempt is over (or the fetch found nothing). Never holding more dispatches than it can run
leaves the rest in the stream for the other executors of the pool. With more handlers than
slots, the idle fetches take turns, every `fetch_wait` seconds. While a fetch waits, its slot
is lent to offers: one that finds no slot free takes it, and a message the fetch then brings
waits up to 3 s for another slot before it goes back to the stream.

Offers. Each handler also takes the dispatches the planner offers on
`planner.offer.<kind>.<target>` before the stream (docs/protocol.md, "Offers"), in a queue group
named like its consumer: with a slot free it claims the attempt, and the claim answers the
offer, so the dispatch is never written to the stream (one durable write less per task);
without one it answers `declined` and the planner publishes it to the stream. `offers=False`
takes dispatches from the stream only.

Claims. Each executor has a random id (`Executor.id`, made when it is built); its claim of an
attempt has an id derived from it and the attempt (`lease.claim_id`), so a dispatch that comes
again to the same executor after a lost claim reply is granted again, and a dispatch that comes
to another executor is not. The claim, the heartbeats and the report carry the dispatch's
`traceparent` header.

Shutdown (SIGINT/SIGTERM, or the `shutdown` event of `serve`): stop fetching; dispatches
fetched but not claimed are nak'ed so that another executor takes them at once; attempts
running keep running, and heartbeating, for up to `grace_period` seconds; those still running
then are stopped and handed back with a retryable `failed` report (a claimed dispatch is
already acked, so a nak is no longer possible: the report is how the planner learns to retry
now rather than after its heartbeat timeout). A second signal ends the grace period at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from . import attempt, reporting, wire
from .handlers import Handler, HandlerFn
from .models.cancel_message import CancelMessage
from .subjects import Subjects, TaskKind, check_token

log = logging.getLogger(__name__)

# How long the dispatch stream waits for an ack before delivering a message again. A fetch
# loop takes a slot before it fetches and acks right after the claim, so this only bounds how
# long a delivery lost in flight (its executor or a cluster node died) stays lost; the server's
# default is 30 s. A consumer made earlier, with another wait, is updated to this one.
DELIVERY_ACK_WAIT_S = 10.0
# How long a fetched dispatch that finds every slot taken waits for one before it goes back to
# the stream: well inside the ack wait, so it needs no progress acks.
SLOT_WAIT_S = 3.0


class Executor:
    """A pool member serving registered handlers; see the module doc for how it behaves.

    `concurrency`: attempts run at once (async and threaded handlers alike; synchronous ones get
    a thread each). `grace_period`: seconds in-flight attempts get to finish at shutdown.
    `fetch_wait`: how long one fetch waits for a dispatch (also the longest a shutdown waits for
    the fetches to end). `request_timeout`: how long a claim, or a report sent directly, waits
    for the planner. `direct_reports`: send reports to the planner as requests first (no stream
    write), publishing them to the report stream when that fails; False: the stream only.
    `nak_delay`: when a dispatch whose claim got no answer comes again. `report_started`:
    publish a `started` report before running. `listen_for_cancels`: also stop attempts on the
    `planner.cancel.*.*` fast path (heartbeats stop them within one interval regardless).
    `consumer_prefix`: the durable consumers' names start with it (default: the subject prefix).
    `offers`: also take the dispatches the planner offers before the stream (module doc).
    `take_next`: each final report asks for the session's next task, which the planner hands
    over with its reply, claimed, to run in the same slot (docs/protocol.md, "The next task
    with the reply"); it needs `direct_reports`.
    """

    def __init__(
        self,
        *,
        subjects: Subjects | None = None,
        concurrency: int = 4,
        grace_period: float = 30.0,
        fetch_wait: float = 1.0,
        request_timeout: float = 5.0,
        nak_delay: float = 1.0,
        report_started: bool = False,
        listen_for_cancels: bool = True,
        consumer_prefix: str | None = None,
        direct_reports: bool = True,
        offers: bool = True,
        take_next: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.subjects = subjects or Subjects()
        self.concurrency = concurrency
        self.grace_period = grace_period
        self.fetch_wait = fetch_wait
        self.request_timeout = request_timeout
        self.nak_delay = nak_delay
        self.report_started = report_started
        self.listen_for_cancels = listen_for_cancels
        self.direct_reports = direct_reports
        self.offers = offers
        self.take_next = take_next
        self.consumer_prefix = consumer_prefix or self.subjects.prefix.replace(".", "_")
        self.id = uuid.uuid4()
        """This executor's random id: its claim ids are derived from it (`lease.claim_id`)."""
        self._handlers: dict[str, Handler] = {}
        self._grace_over = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once every consumer is bound and fetching; cleared when `serve` returns."""
        self._runtime: attempt.Runtime | None = None

    # Registration -------------------------------------------------------------------------

    def handler(self, target: str, *, kind: TaskKind) -> Callable[[HandlerFn], HandlerFn]:
        """Registers the decorated function for dispatches of `kind` to `target`."""
        check_token(target, "target")
        if kind not in ("tool_call", "processing"):
            raise ValueError(f"kind must be 'tool_call' or 'processing', not {kind!r}")

        def register(fn: HandlerFn) -> HandlerFn:
            subject = self.subjects.task(kind, target)
            if subject in self._handlers:
                raise ValueError(f"a handler for {kind} {target!r} is already registered")
            self._handlers[subject] = Handler(kind=kind, target=target, fn=fn)
            return fn

        return register

    def tool(self, target: str) -> Callable[[HandlerFn], HandlerFn]:
        """Registers a handler for tool calls to `target` (`planner.task.tool_call.<target>`)."""
        return self.handler(target, kind="tool_call")

    def processing(self, target: str) -> Callable[[HandlerFn], HandlerFn]:
        """Registers a handler for processing steps `target` (`planner.task.processing.<target>`)."""
        return self.handler(target, kind="processing")

    @property
    def handlers(self) -> list[Handler]:
        """The registered handlers."""
        return list(self._handlers.values())

    @property
    def in_flight(self) -> int:
        """Attempts claimed and not yet over."""
        return len(self._runtime.running) if self._runtime else 0

    # Running ------------------------------------------------------------------------------

    def run(self, servers: str | list[str] = "nats://127.0.0.1:4222", **connect_options: Any) -> None:
        """Connects, serves until SIGINT or SIGTERM, shuts down gracefully, and returns."""
        asyncio.run(self._run(servers, connect_options))

    async def _run(self, servers: str | list[str], connect_options: dict[str, Any]) -> None:
        nc = await nats.connect(servers, **connect_options)
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, shutdown)
        try:
            await self.serve(nc, shutdown=shutdown)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if not nc.is_closed:
                await nc.drain()

    def _on_signal(self, shutdown: asyncio.Event) -> None:
        if not shutdown.is_set():
            log.info("shutting down: no new work; in-flight attempts get %.0fs "
                     "(signal again to hand them back now)", self.grace_period)
            shutdown.set()
        elif self._runtime is not None and not self._runtime.hard_stop.is_set():
            log.info("second signal: handing back in-flight attempts now")
            self._grace_over.set()

    async def serve(self, nc: NatsClient, *, shutdown: asyncio.Event) -> None:
        """Serves the handlers on `nc` until `shutdown` is set, then shuts down gracefully.

        The connection stays open (and is the caller's to close), so tests and applications
        that own one can run an executor on it.
        """
        if not self._handlers:
            raise RuntimeError("no handlers registered")
        self._grace_over.clear()
        threads = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="planner-handler")
        js = nc.jetstream()
        rt = attempt.Runtime(
            nc=nc, js=js, subjects=self.subjects, threads=threads,
            request_timeout=self.request_timeout, nak_delay=self.nak_delay,
            report_started=self.report_started, draining=asyncio.Event(),
            hard_stop=asyncio.Event(), direct=reporting.DirectReports(self.direct_reports),
            executor_id=self.id, take_next=self.take_next,
            handlers={(h.kind, h.target): h for h in self._handlers.values()},
            serves=[self.subjects.task(h.kind, h.target) for h in self._handlers.values()],
        )
        self._runtime = rt
        slots = _Slots(self.concurrency)
        attempts: set[asyncio.Task[None]] = set()
        cancel_sub = None
        offer_subs: list[Any] = []
        loops: list[asyncio.Task[None]] = []
        try:
            if self.listen_for_cancels:
                cancel_sub = await nc.subscribe(self.subjects.cancel(), cb=self._on_cancel)
            subscriptions = await self._bind_all(js, shutdown)
            if subscriptions is None:
                return
            if self.offers:
                for handler, _ in subscriptions:
                    take = self._offer_taker(handler, rt, slots, attempts, shutdown)
                    offer_subs.append(await nc.subscribe(
                        self.subjects.offer(handler.kind, handler.target),
                        queue=self._durable(handler), cb=take))
            loops = [
                asyncio.create_task(self._fetch_loop(sub, handler, rt, slots, attempts, shutdown))
                for handler, sub in subscriptions
            ]
            self.ready.set()
            log.info("serving %s with %d slots",
                     ", ".join(f"{h.kind}.{h.target}" for h in self._handlers.values()),
                     self.concurrency)
            await shutdown.wait()
            await _unsubscribe(offer_subs)
            await self._drain(rt, loops, attempts)
            for _, sub in subscriptions:
                try:
                    await sub.unsubscribe()
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    pass
        finally:
            self.ready.clear()
            for task in loops:
                task.cancel()
            await _unsubscribe(offer_subs)
            if cancel_sub is not None:
                try:
                    await cancel_sub.unsubscribe()
                except Exception:  # noqa: BLE001
                    pass
            rt.hard_stop.set()
            for task in list(attempts):
                task.cancel()
            # Threads cannot be interrupted: ones still running are left to end on their own
            # (and keep the interpreter alive until they do).
            threads.shutdown(wait=False, cancel_futures=True)
            self._runtime = None

    async def _bind_all(
        self, js: JetStreamContext, shutdown: asyncio.Event
    ) -> list[tuple[Handler, JetStreamContext.PullSubscription]] | None:
        """Binds one durable consumer per handler, waiting for the stream if the planner is not up."""
        subscriptions = []
        for subject, handler in self._handlers.items():
            durable = self._durable(handler)
            while True:
                try:
                    # Created or updated first: `pull_subscribe` binds to a consumer that
                    # exists as it is, so one an older version made would keep its wait.
                    await js.add_consumer(
                        self.subjects.tasks_stream,
                        config=ConsumerConfig(
                            name=durable, durable_name=durable, filter_subject=subject,
                            ack_policy=AckPolicy.EXPLICIT, ack_wait=DELIVERY_ACK_WAIT_S,
                        ),
                    )
                    sub = await js.pull_subscribe(
                        subject, durable=durable, stream=self.subjects.tasks_stream,
                    )
                    break
                except nats.js.errors.NotFoundError:
                    log.warning("stream %s not found (is the planner running?); retrying",
                                self.subjects.tasks_stream)
                except nats.js.errors.BadRequestError as error:
                    # Most likely another consumer overlaps this subject on the work queue.
                    raise RuntimeError(
                        f"cannot create the consumer {durable} on {subject}: {error.description}"
                    ) from error
                try:
                    await asyncio.wait_for(shutdown.wait(), timeout=1.0)
                    return None
                except asyncio.TimeoutError:
                    pass
            subscriptions.append((handler, sub))
        return subscriptions

    def _durable(self, handler: Handler) -> str:
        """The handler's durable consumer, and the queue group of its offers."""
        return f"{self.consumer_prefix}-{handler.kind}-{handler.target}"

    def _offer_taker(
        self,
        handler: Handler,
        rt: attempt.Runtime,
        slots: _Slots,
        attempts: set[asyncio.Task[None]],
        shutdown: asyncio.Event,
    ) -> Callable[[Msg], Awaitable[None]]:
        """What takes `handler`'s offers: with a slot free now (or one a fetch loop holds
        while it long-polls, `_Slots.take_for_offer`), an attempt task (the claim answers
        the offer); without one, or shutting down, `declined` at once, and the
        dispatch comes through the stream. An offer never waits for a slot: it would wait
        behind the attempts running, and offers that waited for slots starved the stream's
        fetch loops while offers kept coming (a planner instance killed mid-run left sessions
        waiting on the stream)."""

        async def take(msg: Msg) -> None:
            offer = attempt.Offer(msg)
            if shutdown.is_set() or not await slots.take_for_offer():
                await _settle_offer(offer.decline())
                return
            task = asyncio.create_task(attempt.run(offer, handler, rt))
            attempts.add(task)
            task.add_done_callback(attempts.discard)
            task.add_done_callback(lambda _: slots.free.release())

        return take

    async def _fetch_loop(
        self,
        sub: JetStreamContext.PullSubscription,
        handler: Handler,
        rt: attempt.Runtime,
        slots: _Slots,
        attempts: set[asyncio.Task[None]],
        shutdown: asyncio.Event,
    ) -> None:
        """Fetches one dispatch per slot it takes, until shutdown; each becomes an attempt task.
        While the fetch waits, an offer may take the loop's slot (`_Slots`): a one-slot
        executor whose loop held it declined every offer. A message that arrives after its
        slot was taken waits a little for another, then goes back to the stream
        (`_acquire`)."""
        while not shutdown.is_set():
            if not await _acquire(slots.free, shutdown):
                return
            slots.polling += 1
            msgs: list[Msg] = []
            failed = False
            try:
                msgs = await sub.fetch(1, timeout=self.fetch_wait)
            except nats.errors.TimeoutError:
                pass
            except nats.errors.Error as error:
                log.warning("fetching %s failed: %s", handler.target, error)
                failed = True
            except BaseException:
                if slots.end_poll():
                    slots.free.release()
                raise
            has_slot = slots.end_poll()
            for msg in msgs:
                if not has_slot and not shutdown.is_set():
                    has_slot = await _acquire(slots.free, shutdown, within=SLOT_WAIT_S)
                if shutdown.is_set() or not has_slot:
                    await _nak(msg)
                    continue
                task = asyncio.create_task(attempt.run(msg, handler, rt))
                attempts.add(task)
                task.add_done_callback(attempts.discard)
                task.add_done_callback(lambda _: slots.free.release())
                has_slot = False
            if has_slot:
                slots.free.release()
            if failed:
                await asyncio.sleep(self.fetch_wait)

    async def _drain(
        self, rt: attempt.Runtime, loops: list[asyncio.Task[None]], attempts: set[asyncio.Task[None]]
    ) -> None:
        rt.draining.set()
        for control in rt.running.values():
            control.ctx._begin_shutdown()
        # The fetches end within `fetch_wait`; what they bring is nak'ed.
        await asyncio.gather(*loops, return_exceptions=True)
        if attempts:
            log.info("waiting up to %.0fs for %d attempt(s) in flight", self.grace_period,
                     len(attempts))
            grace_over = asyncio.ensure_future(self._grace_over.wait())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.grace_period
            while attempts and not self._grace_over.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait([*attempts, grace_over], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
            grace_over.cancel()
        if rt.running and attempts:
            for control in list(rt.running.values()):
                control.stop(attempt.SHUTDOWN)
            # The hand-back reports: give them the usual time to be acknowledged.
            await asyncio.wait(list(attempts), timeout=max(self.request_timeout, 1.0) * 2)

    async def _on_cancel(self, msg: Msg) -> None:
        """The fast path: a cancellation for an attempt this executor runs stops it now."""
        rt = self._runtime
        if rt is None:
            return
        try:
            cancel = wire.decode(CancelMessage, msg.data)
        except ValidationError:
            return
        control = rt.running.get((cancel.session, cancel.task_id, cancel.attempt))
        if control is not None:
            control.stop("cancelled")


class _Slots:
    """The executor's `concurrency` slots (`free`). A fetch loop takes one before it fetches,
    so it never fetches more than the executor can run, and lends it while the fetch waits:
    an offer that finds no slot free takes a lent one (`take_for_offer`), and the loop whose
    fetch then returns learns it holds none (`end_poll`). Slots are alike, so which loop
    gives its slot up does not matter. (Single-threaded: asyncio runs no two of these at
    once.)"""

    def __init__(self, concurrency: int) -> None:
        self.free = asyncio.Semaphore(concurrency)
        self.polling = 0  # fetch loops waiting on the stream with a slot taken
        self.lent = 0  # of those slots, taken by offers meanwhile

    async def take_for_offer(self) -> bool:
        """A slot for an offer, now or never: a free one, else one a fetch loop lends."""
        if not self.free.locked():
            await self.free.acquire()  # free: returns at once
            return True
        if self.polling > self.lent:
            self.lent += 1
            return True
        return False

    def end_poll(self) -> bool:
        """A fetch loop's wait on the stream ended: whether it still holds its slot."""
        self.polling -= 1
        if self.lent > 0:
            self.lent -= 1
            return False
        return True


async def _acquire(
    slots: asyncio.Semaphore, shutdown: asyncio.Event, within: float | None = None
) -> bool:
    """Takes a slot, waiting at most `within` seconds (`None`: as long as it takes); False,
    and no slot, when shutdown comes first or the wait ends without one. A fetched dispatch
    waits `SLOT_WAIT_S` when an offer took its loop's slot, then goes back to the stream, for
    another executor or for this one once a slot frees, rather than be kept from them."""
    if shutdown.is_set():
        return False
    if not slots.locked():
        await slots.acquire()  # free: returns at once
        return True
    acquire = asyncio.ensure_future(slots.acquire())
    stop = asyncio.ensure_future(shutdown.wait())
    taken = False
    try:
        await asyncio.wait([acquire, stop], timeout=within, return_when=asyncio.FIRST_COMPLETED)
        taken = acquire.done() and not acquire.cancelled() and not shutdown.is_set()
        return taken
    finally:
        # Whatever ends the wait (its bound, shutdown, this task cancelled), a slot taken and
        # not kept goes back, and a pending take is withdrawn.
        stop.cancel()
        if not acquire.done():
            acquire.cancel()
        elif not acquire.cancelled() and not taken:
            slots.release()


async def _unsubscribe(subscriptions: list[Any]) -> None:
    """Unsubscribes each (once: the list is emptied); the connection may be gone already."""
    while subscriptions:
        try:
            await subscriptions.pop().unsubscribe()
        except Exception:  # noqa: BLE001
            pass


async def _settle_offer(answer: Awaitable[None]) -> None:
    try:
        await answer
    except Exception as error:  # noqa: BLE001
        log.warning("could not answer an offer (the planner sends it to the stream after its "
                    "timeout): %s", error)


async def _nak(msg: Msg) -> None:
    try:
        await msg.nak()
    except Exception as error:  # noqa: BLE001
        log.warning("could not hand back a dispatch: %s", error)
