"""The dashboard's routes: its login, its page, its live stream and its actions.

::

    GET  /                 the dashboard (with a session), else the login form
    POST /login            form field ``cookie``: the node's cookie makes a session
    POST /logout
    GET  /events           server-sent events: ``snapshot`` (the views, JSON) each time
                           they are rebuilt, ``logout`` when the session ends, ``bye``
                           when the endpoint drains
    GET  /api/snapshot     the views now (JSON)
    GET  /api/server?name=NAME   one server: its figures, pid, class, state (a bounded
                           repr) and recent crashes
    POST /api/action       {"op": OP, "args": [...]}: suspend/resume NAME,
                           terminate_child/restart_child/restart SUP ID, downgrade
    GET  /static/{file}    the page's assets, vendored in the package

Who may do what: every route but ``/login`` and the assets needs a session, made by
``POST /login`` with the node's cookie: a random token in an ``HttpOnly``,
``SameSite=Strict`` cookie (no script can read it, no other site can send it), valid
``SESSION_SECONDS``, at most ``MAX_SESSIONS`` at once (the oldest goes). An action also
needs the session's own CSRF token in the ``X-Otpy-Csrf`` header (the page reads it from
its ``<meta>``; another site can neither read it nor, for a JSON body, send this header
without the browser asking the node first), a JSON body, and an ``Origin`` that, when
sent, is the node's own. Forms from another origin are refused (403). Pages carry a
strict Content-Security-Policy: no inline script, nothing from elsewhere.

Every action goes through the Runtime's admin table (``Runtime.admin``), as the admin
endpoint's do: the same checks and errors. A downgrade is installed by the ``install``
callable the node gave the endpoint, in a task of the endpoint's own, so that closing
the page does not abort it.

Failed logins are counted (``otpy_http_refused_total{kind="LoginFailed"}``) and logged
as one ``http_login_failed`` event per 10 s, with the number of ``attempts`` since the
last one, so that a flood of guesses cannot flood the log.

Bounds: at most ``HttpLimits.max_streams`` live streams (one more is 503); a stream
holds one snapshot at most (a client that reads slower than snapshots are made skips
to the newest: they are coalesced, never queued) and is cut when the client does not
take it within ``write_timeout``; an action's body holds at most 64 values.
"""

from __future__ import annotations

import hmac
import html
import json
import math
import os
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio

from .._core.release import Planner
from .._exceptions import BadRequest, NoSuchServer, OtpyError
from .._protocol.http1 import Request, Response, Stream
from .._protocol.json_rules import Undecodable, decode_json, encode_json
from .limits import HttpLimits
from .views import NodeViews, _plain

if TYPE_CHECKING:
    from .._core.runtime import Runtime

SESSION_SECONDS = 8 * 3600.0
MAX_SESSIONS = 64
SESSION_COOKIE = "otpy_session"
CSRF_HEADER = b"x-otpy-csrf"
KEEPALIVE = 15.0  # seconds between two comments on an idle stream
LOG_INTERVAL = 10.0  # seconds between two http_login_failed events
ACTION_OBJECTS = 64

Install = Callable[[Planner], Awaitable[dict[str, Any]]]
Spawn = Callable[..., Any]

_HTML = "text/html; charset=utf-8"
_JSON = "application/json"
HTML_HEADERS = (
    ("content-security-policy",
     "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),  # no-referrer would make Origin "null" too
    ("cache-control", "no-store"),
)
_API_HEADERS = (("cache-control", "no-store"), ("x-content-type-options", "nosniff"))
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".html": _HTML, ".svg": "image/svg+xml", ".png": "image/png",
                 ".txt": "text/plain; charset=utf-8"}

# The actions a page may ask for: the admin operation, and its number of arguments.
# "restart" restarts a running child (terminate_child, then restart_child); the admin
# table's restart_child starts one that is not running, as in OTP.
ACTIONS: dict[str, int] = {"suspend": 1, "resume": 1, "terminate_child": 2,
                           "restart_child": 2, "restart": 2, "downgrade": 0}


def static_files() -> dict[str, tuple[bytes, str]]:
    """The vendored assets, read once: only these names are ever served (the files of
    ``otpy/_serve/static`` and of its ``vendor`` folder)."""
    files = {}
    folder = resources.files("otpy._serve") / "static"
    entries = list(folder.iterdir())
    if (folder / "vendor").is_dir():
        entries += (folder / "vendor").iterdir()
    for entry in entries:
        suffix = os.path.splitext(entry.name)[1]
        if entry.is_file() and suffix in _STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), _STATIC_TYPES[suffix])
    return files


class Session:
    __slots__ = ("csrf", "expiry")

    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        self.csrf = secrets.token_urlsafe(32)


class Dashboard:
    """The dashboard's routes (see the module doc), for a router to mount."""

    def __init__(self, rt: Runtime, views: NodeViews, cookie: bytes, limits: HttpLimits,
                 *, refused: dict[str, int], log: Any, install: Install | None = None,
                 spawn: Spawn | None = None) -> None:
        self.rt = rt
        self.views = views
        self.cookie = cookie
        self.limits = limits
        self.refused = refused
        self.log = log
        self.install = install
        self.spawn = spawn
        self.sessions: dict[str, Session] = {}
        self.static = static_files()
        self._failed = 0  # failed logins not yet logged
        self._failed_log_at = -math.inf
        get, post = ("GET", "HEAD"), ("POST",)
        self.routes: dict[str, tuple[tuple[str, ...], Callable[[Request], Any]]] = {
            "/": (get, self.page),
            "/login": (post, self.login),
            "/logout": (post, self.logout),
            "/events": (get, self.events),
            "/api/snapshot": (get, self.snapshot),
            "/api/server": (get, self.server),
            "/api/action": (post, self.action),
        }

    # -- sessions --------------------------------------------------------------------

    def session(self, request: Request) -> tuple[str, Session] | None:
        """The valid session the request carries, if any."""
        header = request.header(b"cookie")
        if not header:
            return None
        now = trio.current_time()
        for part in header.decode("latin-1").split(";"):
            key, _, value = part.strip().partition("=")
            if key == SESSION_COOKIE:
                session = self.sessions.get(value)
                if session is not None:
                    if now < session.expiry:
                        return value, session
                    del self.sessions[value]
        return None

    def _refuse(self, kind: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1

    def _no_session(self) -> Response:
        self._refuse("NoSession")
        return Response.error(401, "NoSession", "log in first: POST /login with the node's "
                              "cookie (the form at /)", _API_HEADERS)

    def login(self, request: Request) -> Response:
        refused = self._cross_origin(request)
        if refused is not None:
            return refused
        try:
            form = dict(parse_qsl(request.body.decode("utf-8"), max_num_fields=4))
        except (UnicodeDecodeError, ValueError):
            form = {}
        given = form.get("cookie", "").encode()
        if not hmac.compare_digest(given, self.cookie):
            self._refuse("LoginFailed")
            now = trio.current_time()
            self._failed += 1
            if now >= self._failed_log_at:  # one event per LOG_INTERVAL, however many
                self.log.warning("http_login_failed", attempts=self._failed)
                self._failed, self._failed_log_at = 0, now + LOG_INTERVAL
            page = self.render("login.html", error="That is not the node's cookie.")
            page.status = 403
            return page
        now = trio.current_time()
        self.sessions = {t: s for t, s in self.sessions.items() if now < s.expiry}
        while len(self.sessions) >= MAX_SESSIONS:  # the oldest goes
            del self.sessions[min(self.sessions, key=lambda t: self.sessions[t].expiry)]
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(now + SESSION_SECONDS)
        self.log.info("http_login")
        return Response(303, b"", None, (
            ("location", "/"),
            ("set-cookie", f"{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; "
                           f"Max-Age={int(SESSION_SECONDS)}"),
        ))

    def logout(self, request: Request) -> Response:
        refused = self._cross_origin(request)
        if refused is not None:
            return refused
        found = self.session(request)
        if found is not None:
            del self.sessions[found[0]]
            self.views._wake()  # its streams end now
        return Response(303, b"", None, (
            ("location", "/"),
            ("set-cookie", f"{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; "
                           f"Max-Age=0"),
        ))

    def _cross_origin(self, request: Request) -> Response | None:
        """A form or action posted from another site is refused (with SameSite=Strict
        cookies and the CSRF token, a further line of defence)."""
        origin = request.header(b"origin")
        if origin is None:  # not a browser's form, or one that sends no Origin
            return None
        host = request.header(b"host")
        if host is None or origin not in (b"http://" + host, b"https://" + host):
            self._refuse("CrossOrigin")
            return Response.error(403, "CrossOrigin", "a form or action from another "
                                  "origin was refused; use the node's own page")
        return None

    # -- pages -----------------------------------------------------------------------

    def page(self, request: Request) -> Response:
        found = self.session(request)
        if found is None:
            return self.render("login.html", error="")
        return self.render("dashboard.html", csrf=found[1].csrf, node=self.views.node_name)

    def render(self, name: str, **values: str) -> Response:
        text = self.static[name][0].decode("utf-8")
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", html.escape(value))
        return Response(200, text.encode("utf-8"), _HTML, HTML_HEADERS)

    def static_file(self, request: Request, name: str) -> Response:
        entry = self.static.get(name)
        if entry is None or name.endswith(".html"):
            return Response.error(404, "NotFound", f"no static file {name[:80]!r}")
        body, content_type = entry
        return Response(200, body, content_type, (("x-content-type-options", "nosniff"),))

    # -- the live views ----------------------------------------------------------------

    def events(self, request: Request) -> Response:
        found = self.session(request)
        if found is None:
            return self._no_session()
        views = self.views
        if views.streams >= self.limits.max_streams:
            self._refuse("TooManyStreams")
            return Response.error(503, "TooManyStreams",
                                  f"the node serves {self.limits.max_streams} live "
                                  f"dashboards at most; close one", (("retry-after", "5"),))
        token = found[0]
        views.stream_opened()  # counted now, so that the cap holds before it runs

        async def run(send: Callable[[bytes], Awaitable[None]]) -> None:
            try:
                await send(b"retry: 2000\n\n")
                seq = 0  # no snapshot sent yet (the first one is seq 1)
                quiet_since = trio.current_time()
                while True:
                    if views.closing:
                        await send(b"event: bye\ndata: {}\n\n")
                        return
                    session = self.sessions.get(token)
                    if session is None or trio.current_time() >= session.expiry:
                        await send(b"event: logout\ndata: {}\n\n")
                        return
                    if views.seq != seq:
                        # The newest only: a client slower than the snapshots skips.
                        seq = views.seq
                        await send(b"event: snapshot\ndata: " + views.snapshot + b"\n\n")
                        quiet_since = trio.current_time()
                    elif trio.current_time() - quiet_since >= KEEPALIVE:
                        await send(b": keep-alive\n\n")
                        quiet_since = trio.current_time()
                    await views.changed(seq, KEEPALIVE)
            finally:
                views.stream_closed()

        return Stream(200, "text/event-stream", run, (
            ("cache-control", "no-store"), ("x-accel-buffering", "no"),
            ("x-content-type-options", "nosniff")), abandon=views.stream_closed)

    async def snapshot(self, request: Request) -> Response:
        if self.session(request) is None:
            await trio.lowlevel.checkpoint()
            return self._no_session()
        self.views.touch()
        return Response(200, await self.views.current(), _JSON, _API_HEADERS)

    def server(self, request: Request) -> Response:
        if self.session(request) is None:
            return self._no_session()
        self.views.touch()
        try:
            pairs = parse_qsl(request.query, max_num_fields=2, strict_parsing=True)
        except ValueError:
            pairs = []
        name = dict(pairs).get("name")
        if not name:
            return Response.error(400, "BadRequest", "name the server: /api/server?name=NAME",
                                  _API_HEADERS)
        try:
            detail = self.views.detail(name)
        except NoSuchServer as exc:
            return Response.error(404, "NoSuchServer", str(exc), _API_HEADERS)
        return Response(200, json.dumps(detail, default=_plain).encode(), _JSON, _API_HEADERS)

    # -- actions ---------------------------------------------------------------------

    def action(self, request: Request) -> Response | Awaitable[Response]:
        found = self.session(request)
        if found is None:
            return self._no_session()
        given = request.header(CSRF_HEADER) or b""
        if not hmac.compare_digest(given, found[1].csrf.encode()):
            self._refuse("BadCsrfToken")
            self.log.warning("http_action_refused", reason="csrf token")
            return Response.error(403, "BadCsrfToken", "an action needs the page's CSRF "
                                  "token in the X-Otpy-Csrf header; reload the dashboard",
                                  _API_HEADERS)
        refused = self._cross_origin(request)
        if refused is not None:
            return refused
        content_type = (request.header(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/json":
            return Response.error(415, "UnsupportedMediaType", "an action's body is JSON "
                                  "(Content-Type: application/json)", _API_HEADERS)
        try:
            op, args = self._action_of(request.body)
        except BadRequest as exc:
            return Response.error(400, "BadRequest", str(exc), _API_HEADERS)
        self.log.info("dashboard_action", op=op, args=[str(a)[:200] for a in args])
        try:
            if op == "restart":  # a running child: stop it, start it again
                self.rt.admin("terminate_child", args)
                result = self.rt.admin("restart_child", args)
            else:
                result = self.rt.admin(op, args)
        except OtpyError as exc:
            return self._error(exc)
        if isinstance(result, Planner):
            return self._install(result)
        return self._ok(result)

    def _action_of(self, body: bytes) -> tuple[str, tuple[Any, ...]]:
        try:
            value = decode_json(body, max_depth=3, max_objects=ACTION_OBJECTS)
        except Undecodable as exc:
            raise BadRequest(f"an action is JSON, {{\"op\": ..., \"args\": [...]}}: {exc}"
                             ) from None
        if not isinstance(value, dict) or not isinstance(value.get("op"), str):
            raise BadRequest(f"an action is {{\"op\": ..., \"args\": [...]}}; got "
                             f"{str(value)[:80]}")
        op = value["op"]
        args = value.get("args", ())
        if op not in ACTIONS:
            raise BadRequest(f"no action {op[:40]!r}; the actions are {sorted(ACTIONS)}")
        if not isinstance(args, tuple) or len(args) != ACTIONS[op] or \
                not all(isinstance(a, str) for a in args):
            raise BadRequest(f"action {op!r} takes {ACTIONS[op]} names (strings) as args, "
                             f"got {str(args)[:80]}")
        return op, args

    def _ok(self, result: Any) -> Response:
        self.views._poked.set()  # show its effect soon
        return Response(200, encode_json({"ok": True, "result": result}), _JSON,
                        _API_HEADERS)

    def _error(self, exc: Exception) -> Response:
        if not isinstance(exc, OtpyError):
            self.log.error("dashboard_action_failed", error=repr(exc), exc_info=exc)
            return Response.error(500, "InternalError", f"the action failed "
                                  f"({type(exc).__name__}); the node's log says why",
                                  _API_HEADERS)
        kind = type(exc).__name__
        status = 404 if isinstance(exc, NoSuchServer) else 400 if isinstance(
            exc, BadRequest) else 409
        return Response.error(status, kind, str(exc), _API_HEADERS)

    async def _install(self, planner: Planner) -> Response:
        """Install a release (a downgrade) in a task of the endpoint's own: the page
        gets the report, and closing it does not abort the install."""
        if self.install is None or self.spawn is None:
            planner.abort()
            return Response.error(501, "NotImplemented", "this endpoint cannot install "
                                  "releases; serve it with open_node(root, http=...)",
                                  _API_HEADERS)
        done = trio.Event()
        box: dict[str, Any] = {}
        install = self.install

        async def run() -> None:
            try:
                box["report"] = await install(planner)
            except Exception as exc:  # UpgradeFailed, or a bug: said to the page
                box["error"] = exc
            finally:
                done.set()

        self.spawn(run)
        await done.wait()
        if "error" in box:
            return self._error(box["error"])
        return self._ok(box["report"])
