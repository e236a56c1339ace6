"""What the dashboard and ``/metrics`` show of a node, gathered without slowing it.

:class:`NodeViews` keeps the figures a step does not record itself, and builds the
dashboard's views from the node's Runtime:

- **The event feed** (``Events.observe``): crashes (``server_crashed``, abnormal
  ``server_stopped``), restarts, supervisors giving up, releases committed or rolled
  back (with their duration). Counted in totals, and kept in bounded rings: the last
  ``RECENT_EVENTS`` notable events of the node, the last ``CRASHES_PER_SERVER``
  crashes of each of at most ``CRASH_SERVERS`` servers (the least recently crashed
  are forgotten first).
- **Loop lag**: a task sleeps ``LAG_INTERVAL`` and notes how late it wakes.
- **Step statistics**, only while someone watches (a dashboard is open, or ``/metrics``
  or the API was read within ``DEMAND_SECONDS``): each server's share of the loop comes
  from :class:`otpy._sampler.StepSampler` (samples of the node's stack; a step writes
  nothing); its steps per second from an exact count of the steps of the
  ``COUNT_TOP`` busiest servers, taken for ``COUNT_WINDOW`` seconds of every ``TICK``
  or until ``COUNT_CAP`` steps (``Runtime.count_steps``: those steps take the general
  path, so the count costs at most ``COUNT_CAP`` slower steps per server and second;
  every other step, and theirs the rest of the time, costs nothing more); and its step
  time is the one divided by the other.
- **The snapshot** the dashboard's page shows, rebuilt every ``TICK`` while a page is
  open (sooner after a crash) and shared by every open page as one encoded JSON text:
  the node's figures, the supervision tree, the server table, the releases and the
  recent events.

Bounds, so that a node of 100k servers (or 100k crashing ones) is shown at a bounded
cost: the servers are surveyed in chunks of ``SURVEY_CHUNK`` between which the loop
runs, and a rebuild waits until the views have used at most ``VIEW_SHARE`` of the
loop's time since the last; the tree shows at most ``CHILDREN_SHOWN`` children per
supervisor (the first ones, then those restarted most) and ``TREE_ROWS`` rows in all;
the table holds the top ``TABLE_ROWS`` servers by each column users sort by (mailbox,
refused, restarts, steps per second, step time, loop share, crashes), at most seven
times that; a state is shown as a repr bounded in depth, items and characters.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import math
import os
import reprlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import trio

from .._core.names import Pid
from .._exceptions import NoSuchServer
from .._sampler import StepSampler

if TYPE_CHECKING:
    from .._core.runtime import Runtime, Survey
    from .._core.supervisor import SupervisorRuntime

TICK = 1.0  # seconds between two rebuilds of the views, and two step-count windows
COUNT_WINDOW = 0.1  # seconds of each TICK during which the busiest servers' steps count
COUNT_TOP = 32  # servers whose steps are counted in each window
COUNT_CAP = 64  # steps counted per server and window, at most
DEMAND_SECONDS = 60.0  # step statistics run this long after the last reader went
LAG_INTERVAL = 0.1  # seconds between two loop-lag probes
LAG_WINDOW = 10  # the worst lag is the worst of the last LAG_WINDOW seconds
SURVEY_CHUNK = 5000  # servers looked at between two yields to the loop
SLICE = 0.002  # seconds the views hold the loop before they let it run
VIEW_SHARE = 0.02  # at most this share of the loop goes into building views
POKE_DELAY = 0.25  # a crash brings the next rebuild this close (within VIEW_SHARE)
TABLE_ROWS = 50  # servers in the table, by each column
TREE_ROWS = 1000  # rows (children) in the tree, in all
CHILDREN_SHOWN = 50  # children shown per supervisor (and as many of the restarted)
CRASHES_PER_SERVER = 10
CRASH_SERVERS = 1000
RECENT_EVENTS = 50
REASON_CHARS = 300  # of a crash reason or a message, in events
STATE_CHARS = 4000  # of a state's repr
STATS_SERVERS = 256  # servers whose step statistics are kept
UPGRADE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


def _cut(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _reason(value: Any) -> str:
    """A crash reason as text, bounded: ``Kind: message`` for an exception."""
    try:
        if isinstance(value, BaseException):
            return _cut(f"{type(value).__name__}: {value}")
        return _cut(value if isinstance(value, str) else repr(value))
    except Exception:  # a user's __str__ that raises
        return f"<{type(value).__name__}>"


_OBJECT_REPR: Any = object.__repr__


class _StateRepr(reprlib.Repr):
    """A repr bounded in depth, items and characters, also for dataclasses, pydantic
    models and plain objects (whose repr would otherwise be computed whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 16
        self.maxset = self.maxfrozenset = self.maxdeque = 16
        self.maxstring = 200
        self.maxlong = 60
        self.maxother = 200

    def repr_instance(self, x: Any, level: int) -> str:
        cls = type(x)
        fields: Iterable[tuple[str, Any]] | None = None
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = ((f.name, getattr(x, f.name, None)) for f in dataclasses.fields(x))
        elif hasattr(cls, "model_fields") and hasattr(x, "__dict__"):  # pydantic
            fields = vars(x).items()
        elif getattr(cls, "__repr__", None) is _OBJECT_REPR and \
                isinstance(getattr(x, "__dict__", None), dict):
            fields = vars(x).items()
        if fields is None:
            return super().repr_instance(x, level)
        if level <= 0:
            return f"{cls.__qualname__}(...)"
        parts = []
        for i, (key, value) in enumerate(fields):
            if i >= self.maxdict:
                parts.append("...")
                break
            parts.append(f"{key}={self.repr1(value, level - 1)}")
        return f"{cls.__qualname__}({', '.join(parts)})"


_state_repr = _StateRepr()


def bounded_repr(value: Any, limit: int = STATE_CHARS) -> str:
    """``value``'s repr, bounded (see the module doc); a user's own ``__repr__`` is
    called, and its text cut."""
    try:
        return _cut(_state_repr.repr(value), limit)
    except Exception as exc:
        return f"<repr failed: {_reason(exc)}>"


def resident_bytes() -> int | None:
    """This process's resident memory, where /proc tells (Linux); else its peak."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except (ImportError, OSError):  # pragma: no cover - neither (Windows)
            return None


class NodeViews:
    """The figures and views of one node (see the module doc). ``run()`` keeps them
    (a task, until cancelled); ``connections`` tells the endpoint's open connections."""

    def __init__(self, rt: Runtime, *, connections: Callable[[], int] = lambda: 0,
                 node_name: str = "nonode", survey_top: int = TABLE_ROWS) -> None:
        self.rt = rt
        self.survey_top = max(survey_top, TABLE_ROWS)
        self.sched = rt.sched
        self.connections = connections
        self.node_name = node_name
        self.wall_started = time.time()
        self.started = 0.0  # on the loop's clock, set by run()
        # the event feed
        self.crashes_total = 0
        self.restarts_total = 0
        self.gave_up_total = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.crashes: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self.crash_counts: dict[str, int] = {}
        self.upgrade_buckets: dict[str, list[int]] = {}
        self.upgrade_sums: dict[str, float] = {}
        # the loop
        self.lag = 0.0
        self._lag_worst: deque[float] = deque([0.0], maxlen=LAG_WINDOW)
        # step statistics (names -> EWMA), while watched
        self.demand_until = -math.inf
        self._demand = trio.Event()
        self.sampler: StepSampler | None = None
        self.loop_busy: float | None = None
        self.busy: dict[str, float] = {}
        self.rates: dict[str, float] = {}
        self.step_seconds: dict[str, float] = {}
        # the snapshot shared by open pages
        self.snapshot = b"{}"
        self.snapshot_at = -math.inf  # on the loop's clock
        self._build_lock = trio.Lock()
        self.seq = 0
        self.streams = 0
        self.closing = False
        self._changed = trio.Event()
        self._poked = trio.Event()
        self._survey: tuple[float, Survey] | None = None
        self._survey_lock = trio.Lock()
        # what building views cost the loop (read by bench_dashboard.py)
        self.build_seconds = 0.0  # CPU time of the last rebuild (and surveys since)
        self.worst_chunk = 0.0  # the longest the views held the loop at once (CPU)

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the figures, until cancelled."""
        self.started = trio.current_time()
        stop_observing = self.sched.log.observe(self._event)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._lag_probe)
                nursery.start_soon(self._step_statistics)
                nursery.start_soon(self._rebuild)
        finally:
            stop_observing()
            if self.sampler is not None:
                self.sampler.stop()
                self.sampler = None

    def touch(self) -> None:
        """Someone reads the figures: keep the step statistics going a while."""
        self.demand_until = trio.current_time() + DEMAND_SECONDS
        self._demand.set()

    @property
    def watched(self) -> bool:
        return self.streams > 0 or trio.current_time() < self.demand_until

    def close(self) -> None:
        """The endpoint drains: open streams end at once."""
        self.closing = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def changed(self, seq: int, timeout: float) -> None:
        """Return when the snapshot is newer than ``seq``, the endpoint closes, or
        after ``timeout`` seconds."""
        if self.seq != seq or self.closing:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(timeout):
            await self._changed.wait()

    def stream_opened(self) -> None:
        self.streams += 1
        self._demand.set()
        self._poked.set()  # a fresh snapshot for the new page

    def stream_closed(self) -> None:
        self.streams -= 1

    # -- the event feed ------------------------------------------------------------

    def _event(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if event == "server_crashed":
            self._crashed(str(fields.get("server")), fields.get("vsn"),
                          fields.get("exc_info"), fields.get("message"))
        elif event == "server_stopped":  # an abnormal Stop
            self._crashed(str(fields.get("server")), fields.get("vsn"),
                          fields.get("reason"), None)
        elif event == "child_restarted":
            self.restarts_total += 1
        elif event == "supervisor_gave_up":
            self.gave_up_total += 1
            self._note(event, str(fields.get("supervisor")),
                       f"more than {fields.get('max_restarts')} restarts in "
                       f"{fields.get('max_seconds')} s; last: {fields.get('child')}: "
                       f"{_cut(str(fields.get('reason')))}")
            self._poked.set()
        elif event in ("upgrade_committed", "upgrade_rolled_back"):
            outcome = "committed" if event == "upgrade_committed" else "rolled_back"
            seconds = fields.get("seconds")
            if isinstance(seconds, int | float):
                buckets = self.upgrade_buckets.setdefault(outcome,
                                                          [0] * len(UPGRADE_BUCKETS))
                for i, le in enumerate(UPGRADE_BUCKETS):
                    if seconds <= le:
                        buckets[i] += 1
                self.upgrade_sums[outcome] = self.upgrade_sums.get(outcome, 0.0) + seconds
            what = "downgrade from" if fields.get("downgrade") else "upgrade to"
            detail = f"{what} release {fields.get('release')}"
            if isinstance(seconds, int | float):
                detail += f" in {seconds * 1000:.3g} ms" if seconds < 1 else \
                    f" in {seconds:.3g} s"
            self._note(event, "node", detail)
            self._poked.set()

    def _note(self, event: str, who: str, detail: str) -> None:
        self.events.append({"time": time.time(), "event": event, "who": who,
                            "detail": detail})

    def _crashed(self, server: str, vsn: Any, reason: Any, message: Any) -> None:
        self.crashes_total += 1
        entry = {"time": time.time(), "vsn": vsn if isinstance(vsn, str) else None,
                 "reason": _reason(reason),
                 "message": _cut(message) if isinstance(message, str) else None}
        ring = self.crashes.get(server)
        if ring is None:
            if len(self.crashes) >= CRASH_SERVERS:
                old, _ = self.crashes.popitem(last=False)
                self.crash_counts.pop(old, None)
            ring = self.crashes[server] = deque(maxlen=CRASHES_PER_SERVER)
        else:
            self.crashes.move_to_end(server)
        ring.append(entry)
        self.crash_counts[server] = self.crash_counts.get(server, 0) + 1
        self.events.append({"time": entry["time"], "event": "server_crashed",
                            "who": server, "detail": entry["reason"]})
        self._poked.set()

    def last_crash(self, server: str) -> str | None:
        ring = self.crashes.get(server)
        return ring[-1]["reason"] if ring else None

    # -- the loop's lag ------------------------------------------------------------

    async def _lag_probe(self) -> None:
        second = trio.current_time() + 1.0
        while True:
            due = trio.current_time() + LAG_INTERVAL
            await trio.sleep_until(due)
            now = trio.current_time()
            self.lag = max(0.0, now - due)
            if now >= second:
                second = now + 1.0
                self._lag_worst.append(self.lag)
            elif self.lag > self._lag_worst[-1]:
                self._lag_worst[-1] = self.lag

    @property
    def lag_worst(self) -> float:
        return max(self._lag_worst)

    # -- step statistics -----------------------------------------------------------

    async def _step_statistics(self) -> None:
        while True:
            if not self.watched:
                self._demand = trio.Event()
                await self._demand.wait()
            if self.sampler is None:
                self.sampler = StepSampler(threading.get_ident())
                self.sampler.start()
            try:
                while self.watched:
                    await self._tick()
            finally:
                self.sampler.stop()
                self.sampler = None
                self.busy.clear()
                self.rates.clear()
                self.step_seconds.clear()
                self.loop_busy = None

    async def _tick(self) -> None:
        """One TICK: count the busiest servers' steps for COUNT_WINDOW, then read what
        the sampler saw, and fold both into the averages."""
        assert self.sampler is not None
        names = [n for n, _ in heapq.nlargest(COUNT_TOP, self.busy.items(),
                                               key=itemgetter(1))]
        stop = None
        if names:
            try:
                stop = self.rt.count_steps(names, COUNT_CAP)
            except RuntimeError:  # another count runs (a second endpoint): skip
                stop = None
        begin = trio.current_time()
        try:
            await trio.sleep(COUNT_WINDOW)
        finally:
            counts = stop() if stop is not None else {}
        await trio.sleep(TICK - COUNT_WINDOW)
        seconds = self.sampler.take()
        wall = max(trio.current_time() - begin, 1e-6)
        self._fold({n: t / wall for n, t in seconds.items()},
                   {n: steps / max(took, 1e-6) for n, (steps, took) in counts.items()})

    def _fold(self, shares: dict[str, float], rates: dict[str, float]) -> None:
        """Fold one tick's loop shares and step rates into the averages."""
        busy, old_rates, step = self.busy, self.rates, self.step_seconds
        total = min(1.0, sum(shares.values()))
        self.loop_busy = total if self.loop_busy is None else \
            0.5 * self.loop_busy + 0.5 * total
        for name in set(busy) | set(shares):
            value = 0.5 * busy.get(name, 0.0) + 0.5 * min(1.0, shares.get(name, 0.0))
            if value < 1e-4 and name not in rates:
                busy.pop(name, None)
            else:
                busy[name] = value
        for name in set(old_rates) | set(rates):
            if name in rates:
                value = rates[name] if name not in old_rates else \
                    0.5 * old_rates[name] + 0.5 * rates[name]
            else:  # not counted this time: not among the busiest, so fading
                value = 0.5 * old_rates[name]
            if value < 0.5:
                old_rates.pop(name, None)
            else:
                old_rates[name] = value
        step.clear()
        for name, rate in old_rates.items():
            share = busy.get(name)
            if share:
                step[name] = share / rate
        for table in (busy, old_rates):
            if len(table) > STATS_SERVERS:
                keep = dict(heapq.nlargest(STATS_SERVERS, table.items(), key=itemgetter(1)))
                table.clear()
                table.update(keep)

    # -- the survey and the snapshot -------------------------------------------------

    async def survey(self, max_age: float = TICK) -> Survey:
        """A survey of the servers no older than ``max_age`` seconds: the last one, or
        a new one taken in chunks between which the loop runs."""
        async with self._survey_lock:
            now = trio.current_time()
            if self._survey is not None and now - self._survey[0] <= max_age:
                await trio.lowlevel.checkpoint()
                return self._survey[1]
            slices = _Slices(self)
            survey = None
            for part in self.rt.survey(SURVEY_CHUNK, self.survey_top):
                survey = part
                await slices.next()
            slices.end()
            assert survey is not None
            self._survey = (trio.current_time(), survey)
            return survey

    def _held(self, seconds: float) -> None:
        """The views held the loop ``seconds`` at once."""
        self.build_seconds += seconds
        self.worst_chunk = max(self.worst_chunk, seconds)

    async def _rebuild(self) -> None:
        """While pages are open: a new snapshot every TICK (sooner after a crash),
        never using more than VIEW_SHARE of the loop."""
        while True:
            if not self.streams:
                self._poked = trio.Event()
                await self._poked.wait()
                continue
            last = self.snapshot_at
            soonest = last + max(POKE_DELAY, self.build_seconds / VIEW_SHARE)
            with trio.move_on_at(max(last + TICK, soonest)):
                await self._poked.wait()
            await trio.sleep_until(soonest)
            self._poked = trio.Event()
            if self.streams:
                await self._publish()

    async def current(self) -> bytes:
        """The snapshot, rebuilt first if it is older than TICK and the views' share
        of the loop allows (so that readers of the API share one rebuild per TICK, and
        polling it costs no more than an open page)."""
        if trio.current_time() - self.snapshot_at > max(
                TICK, self.build_seconds / VIEW_SHARE):
            await self._publish()
        else:
            await trio.lowlevel.checkpoint()
        return self.snapshot

    async def _publish(self) -> None:
        """Rebuild the snapshot and wake the streams (one rebuild at a time)."""
        async with self._build_lock:
            begin = trio.current_time()
            if begin - self.snapshot_at < POKE_DELAY:  # made while this one waited
                return
            self.build_seconds = 0.0
            view = await self.build()
            start = _cpu()
            self.snapshot = json.dumps(view, separators=(",", ":"),
                                       default=_plain).encode()
            self._held(_cpu() - start)
            self.snapshot_at = begin
            self.seq += 1
            self._wake()

    async def build(self) -> dict[str, Any]:
        """The dashboard's view of the node now (the snapshot, as plain data), built in
        slices between which the loop runs."""
        survey = await self.survey(max_age=0.0)
        slices = _Slices(self)
        tree = await self._tree(survey, slices)
        table = await self._table(survey, slices)
        now = trio.current_time()
        view = {
            "node": self.node_view(survey),
            "tree": tree,
            "servers": table,
            "releases": self.releases_view(now),
            "events": list(reversed(self.events))[:20],
            "limits": {"table_rows": TABLE_ROWS, "tree_rows": TREE_ROWS,
                       "children_shown": CHILDREN_SHOWN},
            "seq": self.seq + 1,
        }
        slices.end()
        return view

    def node_view(self, survey: Survey) -> dict[str, Any]:
        sched = self.sched
        return {
            "name": self.node_name,
            "uptime": time.time() - self.wall_started,
            "started_at": self.wall_started,
            "lag_ms": self.lag * 1000,
            "lag_worst_ms": self.lag_worst * 1000,
            "rss": resident_bytes(),
            "servers": len(sched.procs),
            "supervisors": len(sched.sups),
            "run_queue": len(sched.runq),
            "timers": sched.pending_timers(),
            "queued": survey.queued,
            "suspended": survey.suspended,
            "refused": sum(sched.refused.values()),
            "waiting": sum(len(line) for line in sched.waiting.values()),
            "connections": self.connections(),
            "pages": self.streams,
            "loop_busy": self.loop_busy,
            "sampling": self.sampler.mode if self.sampler is not None else None,
            "crashes": self.crashes_total,
            "restarts": self.restarts_total,
        }

    def releases_view(self, now: float) -> dict[str, Any]:
        history = [{"vsn": r.vsn, "servers": len(r.servers), "some": list(r.servers[:5]),
                    "description": _cut(r.description)} for r in self.rt.releases()]
        installing = self.rt.install_progress()
        if installing is not None:
            installing["seconds"] = max(0.0, now - installing.pop("started"))
        return {"history": history[-20:], "count": len(history), "installing": installing}

    # -- the tree --------------------------------------------------------------------

    async def _tree(self, survey: Survey, slices: _Slices) -> dict[str, Any] | None:
        root = self.rt.root
        if root is None or not root.alive:
            return None
        subs: dict[str, int] = {}
        for sup in list(self.sched.sups.values()):
            if sup.parent is not None:
                subs[sup.parent.name] = subs.get(sup.parent.name, 0) + 1
            await slices.next()
        budget = [TREE_ROWS]
        return await self._supervisor(root, survey, subs, budget, self.sched.clock(),
                                      slices)

    async def _supervisor(self, sup: SupervisorRuntime, survey: Survey,
                          subs: dict[str, int], budget: list[int], now: float,
                          slices: _Slices) -> dict[str, Any]:
        spec = sup.spec
        horizon = now - spec.max_seconds
        specs = sup.specs
        shown = list(itertools.islice(specs, min(CHILDREN_SHOWN, max(budget[0], 0))))
        if len(specs) > len(shown) and budget[0] > len(shown):
            # Beyond the first: the children restarted most, and those restarting.
            seen = set(shown)
            extra = [i for i, _ in await _top(sup.child_restarts.items(), CHILDREN_SHOWN,
                                              slices)]
            extra += sorted(sup.pending)[:CHILDREN_SHOWN]
            for child_id in extra:
                if child_id not in seen and child_id in specs and \
                        len(shown) < min(2 * CHILDREN_SHOWN, budget[0]):
                    seen.add(child_id)
                    shown.append(child_id)
        budget[0] -= len(shown)
        children = []
        for child_id in shown:
            await slices.next()
            if child_id not in specs:  # deleted while the loop ran
                continue
            info = sup.info(child_id)
            row: dict[str, Any] = {"id": child_id, "kind": info.kind, "status": info.status,
                                   "vsn": info.vsn, "restarts": info.restarts,
                                   "restart": specs[child_id].restart.value}
            if info.kind == "supervisor":
                child = self.sched.sups.get(child_id)
                if child is not None and child.parent is sup:
                    row["supervisor"] = await self._supervisor(child, survey, subs, budget,
                                                               now, slices)
            else:
                if info.status == "running":
                    try:
                        stats = self.rt.statistics(child_id)
                    except NoSuchServer:  # pragma: no cover - stopped meanwhile
                        stats = {}
                    if stats.get("status") == "suspended":
                        row["status"] = "suspended"
                    row["mailbox"] = stats.get("mailbox", 0)
                row["last_crash"] = self.last_crash(child_id)
            children.append(row)
        running = survey.running.get(sup.name, 0) + subs.get(sup.name, 0)
        return {
            "name": sup.name, "strategy": spec.strategy.value,
            "max_restarts": spec.max_restarts, "max_seconds": spec.max_seconds,
            "in_window": sum(1 for t in sup.window if t > horizon),
            "children": children, "hidden": len(specs) - len(children),
            "specs": len(specs), "running": min(running, len(specs)),
        }

    # -- the server table ------------------------------------------------------------

    async def _table(self, survey: Survey, slices: _Slices) -> dict[str, Any]:
        n = TABLE_ROWS
        sched = self.sched
        names: dict[str, None] = {}  # ordered, no duplicates

        async def top(items: Iterable[tuple[str, float]]) -> None:
            for name, value in await _top(items, n, slices):
                if value:
                    names[name] = None

        for _, name in survey.busiest:
            names[name] = None
        await top(sched.refused.items())
        restarted: list[tuple[str, int]] = []
        for sup in list(sched.sups.values()):
            restarted += await _top(sup.child_restarts.items(), n, slices)
        await top(restarted)
        await top(self.rates.items())
        await top(self.step_seconds.items())
        await top(self.busy.items())
        await top(self.crash_counts.items())
        for name in survey.suspended_names:
            names[name] = None
        filler = not names
        if filler:  # nothing stands out: the first servers, so the table is not empty
            names = dict.fromkeys(itertools.islice(sched.procs, n))
        rows = []
        for name in names:
            row = self.server_row(name)
            if row is not None:
                rows.append(row)
            await slices.next()
        return {"rows": rows, "total": len(sched.procs), "filler": filler}

    def server_row(self, name: str) -> dict[str, Any] | None:
        try:
            stats = self.rt.statistics(name)
        except NoSuchServer:
            return None
        return {
            "name": name, "status": stats["status"], "vsn": stats["vsn"],
            "supervisor": stats["supervisor"], "mailbox": stats["mailbox"],
            "max_mailbox": stats["max_mailbox"], "refused": stats["refused"],
            "restarts": stats["restarts"], "crashes": self.crash_counts.get(name, 0),
            "steps_per_s": self.rates.get(name), "step_s": self.step_seconds.get(name),
            "busy": self.busy.get(name),
        }

    def detail(self, name: str) -> dict[str, Any]:
        """One server's view: its row, pid, class, state (a bounded repr) and recent
        crashes. Raises NoSuchServer."""
        row = self.server_row(name)
        if row is None:
            raise self.sched.no_such(name)
        server = self.rt.server(name)
        state = self.rt.get_state(name)
        pid = self.sched.whereis(name)
        cls = type(server)
        row.update({
            "pid": str(pid) if pid is not None else None,
            "pid_json": _plain(pid) if pid is not None else None,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "state_type": type(state).__qualname__,
            "state": bounded_repr(state),
            "crash_log": list(reversed(self.crashes.get(name, ()))),
        })
        return row


class _Slices:
    """Loop time taken in slices of at most ``SLICE`` seconds, between which the loop
    runs; each slice is reported to the views (``_held``). Measured in the thread's CPU
    time: what the views cost the loop, not the moments the OS ran something else."""

    __slots__ = ("start", "views")

    def __init__(self, views: NodeViews) -> None:
        self.views = views
        self.start = _cpu()

    async def next(self) -> None:
        """End the slice if it is long enough: let the loop run, start another."""
        held = _cpu() - self.start
        if held >= SLICE:
            self.views._held(held)
            await trio.lowlevel.checkpoint()
            self.start = _cpu()

    def end(self) -> None:
        self.views._held(_cpu() - self.start)
        self.start = _cpu()


_cpu = time.thread_time


async def _top(items: Iterable[tuple[str, Any]], n: int, slices: _Slices
               ) -> list[tuple[str, Any]]:
    """The ``n`` pairs with the largest values, looked at in chunks between which the
    loop may run (a dict of 100k refusals or restarts is not scanned at once)."""
    pending = list(items)
    best: list[tuple[str, Any]] = []
    for i in range(0, len(pending), SURVEY_CHUNK):
        best = heapq.nlargest(n, itertools.chain(best, pending[i:i + SURVEY_CHUNK]),
                              key=itemgetter(1))
        await slices.next()
    return best


def _plain(value: Any) -> Any:
    """What json cannot carry in a view: a pid in the JSON rule's form, else its text."""
    if type(value) is Pid:
        return {"$pid": [value.node, value.creation, value.name, value.serial]}
    return str(value)
