"""The HTTP endpoint of a node: calls and casts in JSON or msgpack, health, metrics and
the dashboard's login (``serve_http``; ``open_node(root, http=...)`` starts it), on the
server of ``otpy._serve.http_server``.

Routes (``NodeRouter``)::

    POST /call/{name}    body: the request (JSON, or msgpack by Content-Type); options
                         ?timeout=SECONDS and ?vsn=VSN; answer: the reply, 200
    POST /cast/{name}    body: the message; answer 202, empty
    GET  /healthz        200 while the loop answers
    GET  /readyz         200 once the tree is started; 503 while a release installs, and
                         while the endpoint drains
    GET  /metrics        Prometheus' text format (prometheus-client)
    GET  /               the dashboard, for holders of the node's cookie; else a login
    POST /login, /logout, GET /events, /api/...: the dashboard's (``_serve.dashboard``)
    GET  /static/{file}  the vendored assets in ``otpy/_serve/static``

``{name}`` is a server's name (percent-decoded), ``name@node``, or a pid in the JSON form
a reply gives it, ``{"$pid": [node, creation, name, serial]}`` (``json_rules``).

The body is JSON unless its Content-Type says msgpack (so curl's default form type is
read as JSON: ``curl -d '["add", 1]' HOST:PORT/call/counter`` works); JSON follows the
one rule of ``otpy._protocol.json_rules``, shared with ``otpy call``. The reply is JSON,
or msgpack for a msgpack body or ``Accept: application/msgpack``.

Errors are statuses with a JSON body ``{"error": kind, "message": ...}``: 404
``NoSuchServer`` (``NotFound`` for a route), 504 ``CallTimeout``, 500 ``ServerCrashed``
(its message only: no traceback leaves the node), 429 ``MailboxFull`` with
``Retry-After``, 503 ``ServerStopped``, 400 for a body or option that cannot be read
(``BadJson``, ``BadMsgpack``, ``TooDeep``, ``BadRequest``), 413 ``TooManyObjects`` and
``BodyTooLarge``, 405 with ``Allow``, and the server's own refusals (431, 408, 503
``TooManyConnections``). A reply that cannot be encoded is a 500 ``UnencodableReply``
naming its type.

Calls are delivered through the core's one call path, ``Runtime.start_call``, with a
caller (``_HttpCaller``) whose reply or error becomes the response as soon as it comes:
a call to an idle server is answered within its own step, with no task and no wait; a
call that has to wait parks the connection's own task (responses stay in request
order), and the core's timer gives up on it after its timeout.

The dashboard, its login, its live stream and its actions are ``_serve.dashboard``'s;
what it shows, and what ``/metrics`` counts beyond the scheduler's own counters, is
gathered by ``_serve.views.NodeViews``, which ``serve_http`` runs beside the server.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_to_bytes

import outcome
import structlog
import trio

from .._cookie import read_cookie
from .._core.names import Pid
from .._core.server import WAITING, Caller
from .._exceptions import (
    BadRequest,
    CallTimeout,
    MailboxFull,
    NoSuchServer,
    OtpyError,
    ServerCrashed,
    ServerStopped,
    StepTimeout,
    SupervisorError,
    UpgradeFailed,
    WouldBlock,
)
from .._protocol.http1 import Request, Response
from .._protocol.json_rules import (
    JSON_CONTENT_TYPE,
    MSGPACK_CONTENT_TYPE,
    Undecodable,
    Unencodable,
    address_of,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)
from .dashboard import Dashboard, Install, Spawn
from .http_server import HttpLimits as HttpLimits
from .http_server import HttpStats as HttpStats
from .http_server import Router as Router
from .http_server import serve_router as serve_router
from .views import TICK, UPGRADE_BUCKETS, NodeViews, resident_bytes

if TYPE_CHECKING:
    from .._core.runtime import Runtime, Survey

_log = structlog.get_logger("otpy")


async def serve_http(rt: Runtime, address: tuple[str, int], *,
                     limits: HttpLimits | None = None, cookie: bytes | None = None,
                     shutdown: trio.Event | None = None, install: Install | None = None,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the node's HTTP endpoint on ``address`` until cancelled, or until
    ``shutdown`` is set and the requests in progress are done; reports the bound
    ``(host, port)`` through ``nursery.start``. The dashboard's cookie is ``cookie``,
    else the node's (read, or its file created, first); ``install`` drives a release
    (a downgrade asked for on the dashboard) to its commit, as the node's does."""
    limits = limits or HttpLimits()
    secret = cookie if cookie is not None else read_cookie(create=True)
    stats = HttpStats()
    async with trio.open_nursery() as nursery:
        views = NodeViews(rt, connections=lambda: stats.connections,
                          node_name=rt.sched.node, survey_top=limits.metrics_top_k)
        router = NodeRouter(rt, limits, stats, secret, views=views, install=install,
                            spawn=nursery.start_soon)
        nursery.start_soon(views.run)
        if shutdown is not None:
            nursery.start_soon(_close_on, shutdown, views)
        await serve_router(router, address, limits=limits, shutdown=shutdown, stats=stats,
                           task_status=task_status)
        nursery.cancel_scope.cancel()


async def _close_on(shutdown: trio.Event, views: NodeViews) -> None:
    await shutdown.wait()
    views.close()  # live streams end, so that the drain need not wait for them


# -- the node's routes -----------------------------------------------------------------

_MSGPACK_TYPES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")
_NO_HEADERS: tuple[tuple[str, str], ...] = ()

# otpy's errors as statuses; the first class that matches wins (subclasses first).
_STATUS_OF: tuple[tuple[type[OtpyError], int], ...] = (
    (NoSuchServer, 404), (CallTimeout, 504), (MailboxFull, 429), (ServerCrashed, 500),
    (StepTimeout, 500), (ServerStopped, 503), (WouldBlock, 503), (BadRequest, 400),
    (SupervisorError, 409), (UpgradeFailed, 409),
)


def _status_of(exc: OtpyError) -> int:
    for cls, status in _STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 500


def _is_msgpack(content_type: bytes | None) -> bool:
    if content_type is None or b"msgpack" not in content_type.lower():
        return False  # nearly always: decided without splitting
    return content_type.split(b";", 1)[0].strip().lower() in _MSGPACK_TYPES


def _headers_of(request: Request) -> tuple[bytes | None, bytes | None]:
    """The request's Content-Type and Accept, in one pass over its headers."""
    content_type = accept = None
    for key, value in request.headers:
        if key == b"content-type":
            content_type = value
        elif key == b"accept":
            accept = value
    return content_type, accept


class NodeRouter:
    """The routes of a node's HTTP endpoint (see the module docstring).

    A request reaches a server through ``_deliver_call`` and ``_deliver_cast`` only:
    the core's ``start_call`` with a caller (``_HttpCaller``) whose answer becomes the
    response, and ``Runtime.cast``."""

    def __init__(self, rt: Runtime, limits: HttpLimits, stats: HttpStats,
                 cookie: bytes, *, views: NodeViews | None = None,
                 install: Install | None = None, spawn: Spawn | None = None) -> None:
        self.rt = rt
        self.limits = limits
        self.stats = stats
        self.log = _log.bind(endpoint="http")
        self.views = views if views is not None else NodeViews(
            rt, connections=lambda: stats.connections, node_name=rt.sched.node,
            survey_top=limits.metrics_top_k)
        self.dashboard = Dashboard(rt, self.views, cookie, limits, refused=stats.refused,
                                   log=self.log, install=install, spawn=spawn)
        self.metrics = _Metrics(rt, stats, self.views, limits.metrics_top_k)
        get = ("GET", "HEAD")
        self.fixed: dict[str, tuple[tuple[str, ...], Callable[[Request], Any]]] = {
            "/healthz": (get, self._healthz),
            "/readyz": (get, self._readyz),
            "/metrics": (get, self._metrics),
            **self.dashboard.routes,
        }

    def route(self, request: Request) -> Response | Awaitable[Response]:
        path = request.path
        if path.startswith("/call/"):
            if request.method != "POST":
                return _not_allowed(request, ("POST",))
            return self._call(request, path[6:])
        if path.startswith("/cast/"):
            if request.method != "POST":
                return _not_allowed(request, ("POST",))
            return self._cast(request, path[6:])
        entry = self.fixed.get(path)
        if entry is None:
            if path.startswith("/static/"):
                if request.method not in ("GET", "HEAD"):
                    return _not_allowed(request, ("GET", "HEAD"))
                return self.dashboard.static_file(request, path[8:])
            return Response.error(404, "NotFound",
                                  f"no route {request.method} {path[:200]}; the routes are "
                                  f"POST /call/NAME, POST /cast/NAME, GET /healthz, "
                                  f"/readyz, /metrics and / (the dashboard)")
        methods, handler = entry
        if request.method not in methods:
            return _not_allowed(request, methods)
        result: Response | Awaitable[Response] = handler(request)
        return result

    # -- calls and casts -----------------------------------------------------------

    def _call(self, request: Request, raw_name: str) -> Response | Awaitable[Response]:
        content_type, accept = _headers_of(request)
        try:
            name = _server_name(raw_name)
            timeout, vsn = self._options(request.query, call=True)
            msgpack_in = _is_msgpack(content_type)
            body = self._decode(request, msgpack_in)
        except BadRequest as exc:
            return self._bad(exc)
        return self._deliver_call(name, body, timeout, vsn,
                                  msgpack_in or _is_msgpack(accept))

    def _cast(self, request: Request, raw_name: str) -> Response:
        try:
            name = _server_name(raw_name)
            self._options(request.query, call=False)
            body = self._decode(request, _is_msgpack(request.header(b"content-type")))
        except BadRequest as exc:
            return self._bad(exc)
        return self._deliver_cast(name, body)

    # The seam: how a request reaches a server, and how its outcome is answered.

    def _deliver_call(self, name: str | Pid, request: Any, timeout: float, vsn: str | None,
                      msgpack_out: bool) -> Response | Awaitable[Response]:
        """Through the core's one call path: an idle server answers within this step,
        and the response is ready with no task and no wait; otherwise the connection's
        own task waits for it (the core's timer gives up after ``timeout``)."""
        caller = _HttpCaller(self, msgpack_out)
        self.rt.start_call(name, request, caller, vsn=vsn, timeout=timeout)
        if caller.response is not None:
            return caller.response
        return caller.wait()

    def _deliver_cast(self, name: str | Pid, message: Any) -> Response:
        try:
            self.rt.cast(name, message)
        except Exception as exc:
            return self.error_response(exc)
        return Response(202, b"", None)

    def reply_response(self, reply: Any, msgpack_out: bool) -> Response:
        """A call's reply as a 200, or a 500 that says why it cannot be encoded. Never
        raises: it runs inside the step that answered."""
        try:
            if msgpack_out:
                return Response(200, encode_msgpack(reply), MSGPACK_CONTENT_TYPE)
            return Response(200, encode_json(reply), JSON_CONTENT_TYPE)
        except Unencodable as exc:
            self.log.warning("http_reply_unencodable", error=str(exc))
            return Response.error(500, "UnencodableReply", str(exc))
        except Exception as exc:  # e.g. a model_dump that raises
            self.log.warning("http_reply_unencodable", error=repr(exc))
            return Response.error(500, "UnencodableReply",
                                  f"the reply could not be encoded ({type(exc).__name__}: "
                                  f"{exc}); reply with plain values")

    def error_response(self, exc: BaseException) -> Response:
        """A call's or cast's error as its status: otpy's errors by kind (no
        traceback leaves the node), anything else a 500 logged here."""
        if isinstance(exc, OtpyError):
            status = _status_of(exc)
            headers = (("retry-after", "1"),) if status == 429 else _NO_HEADERS
            return Response.error(status, type(exc).__name__, str(exc) or
                                  type(exc).__name__, headers)
        self.log.error("http_call_failed", error=repr(exc), exc_info=exc)
        return Response.error(500, "InternalError",
                              f"the node failed to serve this call ({type(exc).__name__}); "
                              f"its log says why")

    def _decode(self, request: Request, msgpack_in: bool) -> Any:
        body = request.body
        if not body:
            raise BadRequest("the body is empty; send the request as JSON (e.g. "
                             "'[\"add\", 1]' or '\"incr\"') or as msgpack with "
                             "Content-Type: application/msgpack")
        limits = self.limits
        if msgpack_in:
            return decode_msgpack(body, max_depth=limits.max_depth,
                                  max_objects=limits.max_objects)
        return decode_json(body, max_depth=limits.max_depth, max_objects=limits.max_objects)

    def _options(self, query: str, *, call: bool) -> tuple[float, str | None]:
        timeout = self.limits.call_timeout
        vsn = None
        if not query:
            return timeout, vsn
        known = "timeout and vsn" if call else "none"
        try:
            pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=4,
                              errors="strict")
        except ValueError as exc:
            raise BadRequest(f"the query string cannot be read ({exc}); the options are "
                             f"{known}") from None
        for key, value in pairs:
            if call and key == "timeout":
                try:
                    timeout = float(value)
                except ValueError:
                    timeout = math.nan
                if not 0 < timeout <= self.limits.max_call_timeout:
                    raise BadRequest(f"timeout must be seconds, more than 0 and at most "
                                     f"{self.limits.max_call_timeout:g}; got {value[:40]!r}")
            elif call and key == "vsn":
                if not value:
                    raise BadRequest("vsn must name a version, e.g. ?vsn=1")
                vsn = value
            else:
                raise BadRequest(f"unknown option {key[:40]!r}; the options are {known}")
        return timeout, vsn

    def _bad(self, exc: BadRequest) -> Response:
        if isinstance(exc, Undecodable):
            status = 413 if exc.kind == "TooManyObjects" else 400
            return Response.error(status, exc.kind, str(exc))
        return Response.error(400, "BadRequest", str(exc))

    # -- health and metrics --------------------------------------------------------

    def _healthz(self, request: Request) -> Response:
        return Response(200, b'{"status":"ok"}')

    def _readyz(self, request: Request) -> Response:
        if self.stats.draining:
            return Response.error(503, "Draining", "the node is shutting down")
        if not self.rt.sched.sups:
            return Response.error(503, "NotStarted", "the supervision tree is not running")
        if self.rt.installing:
            return Response.error(503, "Upgrading", "a release is being installed")
        return Response(200, b'{"status":"ready"}')

    async def _metrics(self, request: Request) -> Response:
        return Response(200, await self.metrics.render(), _Metrics.content_type)

class _HttpCaller(Caller):
    """A call made over HTTP: its reply or error becomes the response, made as soon as
    it comes (inside the step that answered). Answered within ``start_call``, the
    response is simply there; else the connection's task parks in :meth:`wait` until
    it comes (or the core's deadline fails the call)."""

    __slots__ = ("msgpack_out", "response", "router", "task")

    def __init__(self, router: NodeRouter, msgpack_out: bool) -> None:
        self._status = WAITING
        self.router = router
        self.msgpack_out = msgpack_out
        self.response: Response | None = None
        self.task: Any = None

    def _resolve(self, value: Any) -> None:
        self._done(self.router.reply_response(value, self.msgpack_out))

    def _reject(self, exc: BaseException) -> None:
        self._done(self.router.error_response(exc))

    def _done(self, response: Response) -> None:
        task = self.task
        if task is None:
            self.response = response
        else:
            self.task = None
            trio.lowlevel.reschedule(task, outcome.Value(response))

    async def wait(self) -> Response:
        """Park the calling (connection's) task until the response is made; cancelled
        (the connection closes, the endpoint's drain ends), the call is given up and a
        late reply dropped."""
        if self.response is not None:  # made between start_call and this wait
            await trio.lowlevel.checkpoint()
            return self.response
        self.task = trio.lowlevel.current_task()
        response: Response = await trio.lowlevel.wait_task_rescheduled(self._abort)
        return response

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._give_up()
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


def _not_allowed(request: Request, methods: Iterable[str]) -> Response:
    allowed = ", ".join(methods)
    return Response.error(405, "MethodNotAllowed",
                          f"{request.method} is not allowed on {request.path[:200]}; use "
                          f"{allowed}", (("allow", allowed),))


def _server_name(raw: str) -> str | Pid:
    """The address in a ``/call/`` or ``/cast/`` path: a name (percent-decoded), or a pid
    in the JSON form its replies give it (``json_rules.address_of``)."""
    if raw.isascii() and "%" not in raw and raw and raw[0] != "{":
        return raw  # nearly always: nothing to decode
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the server name in the path is not UTF-8 once percent-decoded"
                         ) from None
    if not name:
        raise BadRequest("no server name: POST /call/NAME or /cast/NAME")
    return address_of(name)


class _Metrics:
    """``/metrics``: the node's counters in Prometheus' text format. Per-server series
    only for ``top_k`` servers each, so that cardinality stays bounded: by mailbox
    length (then refused messages), by share of the loop (steps per second, step time),
    and by crashes; servers that stand out in none get none, so series do not churn.
    A scrape reuses the views' survey of the servers when it is fresh (else takes one,
    in chunks between which the loop runs), and keeps the step statistics going."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, rt: Runtime, stats: HttpStats, views: NodeViews, top_k: int) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.rt = rt
        self.stats = stats
        self.views = views
        self.top_k = top_k
        self.content_type = CONTENT_TYPE_LATEST
        self.registry = CollectorRegistry(auto_describe=False)
        self.snapshot: tuple[Survey | None, list[tuple[int, int, int, str]]] = (None, [])
        self.registry.register(self)

    async def render(self) -> bytes:
        from prometheus_client.exposition import generate_latest

        views = self.views
        views.touch()
        survey = await views.survey(max_age=TICK)
        rt = self.rt
        names = {name for _, name in survey.busiest}
        names.update(n for n, _ in heapq.nlargest(self.top_k, rt.sched.refused.items(),
                                                  key=itemgetter(1)))
        top: list[tuple[int, int, int, str]] = []
        for name in names:
            try:
                s = rt.statistics(name)
            except NoSuchServer:  # stopped meanwhile
                continue
            top.append((s["mailbox"], s["refused"], s["restarts"], name))
        top.sort(reverse=True)
        self.snapshot = (survey, top[:self.top_k])
        data: bytes = generate_latest(self.registry)
        return data

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        survey, top = self.snapshot
        sched = self.rt.sched
        views = self.views
        for name, help_text, value in (
                ("otpy_servers", "Running servers.", len(sched.procs)),
                ("otpy_supervisors", "Running supervisors.", len(sched.sups)),
                ("otpy_run_queue", "Servers with messages waiting to be served.",
                 len(sched.runq)),
                ("otpy_timers", "Pending timers.", sched.pending_timers()),
                ("otpy_queued_messages", "Messages queued in all mailboxes.",
                 survey.queued if survey is not None else 0),
                ("otpy_suspended_servers", "Suspended servers.",
                 survey.suspended if survey is not None else 0),
                ("otpy_waiting_calls", "Calls waiting for room in a full mailbox.",
                 sum(len(line) for line in sched.waiting.values())),
                ("otpy_loop_lag_seconds", "How late the loop last woke a sleeping task.",
                 views.lag),
                ("otpy_loop_lag_max_seconds", "The worst loop lag of the last 10 s.",
                 views.lag_worst),
                ("otpy_uptime_seconds", "Seconds since the HTTP endpoint started.",
                 time.time() - views.wall_started)):
            yield GaugeMetricFamily(name, help_text, value=value)
        rss = resident_bytes()
        if rss is not None:
            yield GaugeMetricFamily("otpy_resident_memory_bytes",
                                    "Resident memory of the node's process.", value=rss)
        if views.loop_busy is not None:
            yield GaugeMetricFamily("otpy_loop_busy_ratio",
                                    "Share of the loop's time spent in callbacks "
                                    "(sampled).", value=views.loop_busy)
        for name, help_text, value in (
                ("otpy_refused_messages", "Messages refused because a mailbox was full.",
                 sum(sched.refused.values())),
                ("otpy_crashes", "Server crashes (and abnormal stops).",
                 views.crashes_total),
                ("otpy_restarts", "Children restarted by their supervisors.",
                 views.restarts_total),
                ("otpy_supervisors_gave_up", "Supervisors that exceeded their restart "
                 "intensity.", views.gave_up_total)):
            yield CounterMetricFamily(name, help_text, value=value)
        upgrades = HistogramMetricFamily("otpy_upgrade_duration_seconds",
                                         "Releases installed (upgrades and downgrades), "
                                         "from planning to commit or rollback.",
                                         labels=["outcome"])
        for result, counts in sorted(views.upgrade_buckets.items()):
            upgrades.add_metric(
                [result], [(_le(le), count) for le, count in zip(UPGRADE_BUCKETS, counts,
                                                                   strict=True)],
                views.upgrade_sums.get(result, 0.0))
        yield upgrades
        mailbox = GaugeMetricFamily("otpy_server_mailbox", "Queued messages (top servers).",
                                    labels=["server"])
        refused = CounterMetricFamily("otpy_server_refused_messages",
                                      "Messages refused by a full mailbox (top servers).",
                                      labels=["server"])
        restarts = CounterMetricFamily("otpy_server_restarts",
                                       "Restarts of the server (top servers).",
                                       labels=["server"])
        for box, ref, rst, name in top:
            mailbox.add_metric([name], box)
            refused.add_metric([name], ref)
            restarts.add_metric([name], rst)
        yield mailbox
        yield refused
        yield restarts
        busy = GaugeMetricFamily("otpy_server_busy_ratio", "Share of the loop's time in "
                                 "the server's callbacks (sampled; top servers).",
                                 labels=["server"])
        rate = GaugeMetricFamily("otpy_server_steps_per_second", "Steps per second "
                                 "(counted in short windows; top servers).",
                                 labels=["server"])
        step = GaugeMetricFamily("otpy_server_step_seconds", "Mean step time (loop "
                                 "share / steps per second; top servers).",
                                 labels=["server"])
        for name, share in heapq.nlargest(self.top_k, views.busy.items(),
                                          key=itemgetter(1)):
            busy.add_metric([name], share)
            if name in views.rates:
                rate.add_metric([name], views.rates[name])
            if name in views.step_seconds:
                step.add_metric([name], views.step_seconds[name])
        yield busy
        yield rate
        yield step
        crashes = CounterMetricFamily("otpy_server_crashes", "Crashes of the server since "
                                      "the endpoint started (top servers).",
                                      labels=["server"])
        for name, count in heapq.nlargest(self.top_k, views.crash_counts.items(),
                                          key=itemgetter(1)):
            crashes.add_metric([name], count)
        yield crashes
        stats = self.stats
        yield GaugeMetricFamily("otpy_http_connections", "Open HTTP connections.",
                                value=stats.connections)
        yield GaugeMetricFamily("otpy_dashboard_streams", "Open dashboard pages (live "
                                "streams).", value=views.streams)
        yield CounterMetricFamily("otpy_http_connections_accepted",
                                  "HTTP connections accepted.", value=stats.accepted)
        responses = CounterMetricFamily("otpy_http_responses", "HTTP responses by status.",
                                        labels=["status"])
        for status, count in sorted(stats.responses.items()):
            responses.add_metric([str(status)], count)
        yield responses
        refusals = CounterMetricFamily("otpy_http_refused", "HTTP refusals by kind.",
                                       labels=["kind"])
        for kind, count in sorted(stats.refused.items()):
            refusals.add_metric([kind], count)
        yield refusals


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(bound)
