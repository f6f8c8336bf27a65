"""The models a server serves, by name: looked up for each call, described for GetModelInfo, and changed by
reloads and the admin port (service/api/reload.py). A change replaces the entry at once (new calls get the
new model); the calls already running keep the engine they looked up."""

from __future__ import annotations

import grpc

from service.api.config import ServerConfig
from service.api.messages import model_info
from service.api.validate import Refused
from service.history.histories import Histories
from service.model.engine import Engine, by_name
from service.pb.nextword.v1 import nextword_pb2 as pb


class ServedModels:
    def __init__(self, engines: Engine | dict[str, Engine], config: ServerConfig, histories: Histories | None) -> None:
        """``engines``: the served models by name, the first answering requests that name none."""
        self.engines = by_name(engines)
        self.config, self.histories = config, histories
        self._refresh()

    def get(self, name: str) -> Engine:
        """The model a request names (empty: the first); NOT_FOUND naming those that exist."""
        engine = self.engines.get(name) if name else self.default
        if engine is None:
            names = ", ".join(repr(n) for n in self.engines)
            raise Refused(f"no model named {name[:64]!r}; this server has {names}", grpc.StatusCode.NOT_FOUND)
        return engine

    def info(self, name: str) -> pb.GetModelInfoResponse:
        return self._info[name]

    def swap(self, name: str, engine: Engine) -> Engine | None:
        """Serve ``engine`` as ``name`` from the next call on; the engine it replaces (None: a new name)."""
        old = self.engines.get(name)
        self.engines[name] = engine
        self._refresh()
        return old

    def remove(self, name: str) -> Engine:
        """Serve ``name`` no more; the engine removed."""
        old = self.engines.pop(name)
        self._refresh()
        return old

    def _refresh(self) -> None:
        self.default = self.engines[next(iter(self.engines))]  # requests that name no model get the first
        self._info = {  # fixed between changes, so built once
            name: model_info(name, engine, self.engines, self.config, self.histories)
            for name, engine in self.engines.items()
        }
