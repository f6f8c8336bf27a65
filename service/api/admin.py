"""The admin port (``--admin-port``, off by default, as TorchServe's management API is): which models are
served, and adding, reloading and removing one at run time. Every call needs a bearer token bound to the
user ``admin`` in ``--auth-token-file`` (``TOKEN admin``).

    GET    /admin/models                 each served model: name, path, version (sha256, short), loaded_at, calls
    POST   /admin/models                 {"name": "zh", "path": "models/zh.pt"}: load, warm up, serve it
    POST   /admin/models/{name}:reload   reload one model whose file changed (POST /admin/reload: all of them)
    DELETE /admin/models/{name}          serve it no more (its calls finish on it)

With ``--workers`` the parent serves this port and carries each operation out in one worker at a time
(service/api/workers.py); the answer lists each worker's result. A refusal has the status its gRPC code
maps to (service/api/http_calls.py) and ``{"code", "message"}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import grpc
from aiohttp import web

from service.api.app_thread import AppThread
from service.api.http_calls import HTTP_STATUS, error_body
from service.api.users import Grant, granted

ADMIN = "admin"  # the user a token must be bound to


def admin_grants(grants: Sequence[Grant]) -> list[Grant]:
    """The tokens that may call the admin port; ValueError when there is none (the port would be open or shut)."""
    found = [grant for grant in grants if grant.users is not None and ADMIN in grant.users]
    if not found:
        raise ValueError("--admin-port needs --auth-token-file with a token bound to admin (a line 'TOKEN admin')")
    return found


class AdminPort:
    """The admin routes over ``controller(op, args) -> result``, on a thread and event loop of their own."""

    def __init__(self, grants: Sequence[Grant]) -> None:
        self.controller: Callable[[str, dict], dict] = lambda op, args: {}
        self.grants = admin_grants(grants)
        self._app = AppThread("admin-loop")
        self.port = 0

    @classmethod
    def checked(cls, config, grants: Sequence[Grant]) -> AdminPort | None:
        """The admin port a server's config asks for (None: off); ValueError when no token may call it."""
        return None if config.admin_port is None else cls(grants)

    def start(self, controller: Callable[[str, dict], dict], host: str, port: int) -> int:
        self.controller = controller
        app = web.Application(client_max_size=64 << 10)
        app.router.add_get("/admin/models", lambda request: self._call(request, "list"))
        app.router.add_post("/admin/models", lambda request: self._call(request, "add"))
        app.router.add_post("/admin/reload", lambda request: self._call(request, "reload"))
        app.router.add_post("/admin/models/{name}:reload", lambda request: self._call(request, "reload"))
        app.router.add_delete("/admin/models/{name}", lambda request: self._call(request, "remove"))
        self.port = self._app.start(app, host, port)
        return self.port

    def stop(self) -> None:
        self._app.stop(30)

    async def _call(self, request: web.Request, op: str) -> web.Response:
        grant = granted(self.grants, request.headers.get("authorization", ""))
        if grant is None:
            return refusal("UNAUTHENTICATED", "the admin port needs 'authorization: Bearer <a token bound to admin>'")
        args: dict = {}
        if request.can_read_body:
            try:
                args = json.loads(await request.read())
            except ValueError:
                return refusal("INVALID_ARGUMENT", "the body is not valid JSON")
            if not isinstance(args, dict):
                return refusal("INVALID_ARGUMENT", "the body must be a JSON object")
        if "name" in request.match_info:
            args["name"] = request.match_info["name"]
        result = await self._app.loop.run_in_executor(None, self.controller, op, args)
        errors = [result, *result.get("workers", [])]
        failed = next((part for part in errors if "error" in part), None)
        if failed is not None:
            return refusal(failed["error"], failed["message"])
        return web.json_response(result)


def refusal(code: str, message: str) -> web.Response:
    status = grpc.StatusCode[code]
    return web.json_response(error_body(status, message, ""), status=HTTP_STATUS.get(status, 500))
