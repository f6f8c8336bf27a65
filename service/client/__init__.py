"""The Python client of nextword.v1 (its command line: service/client/__main__.py).

with NextWordClient("localhost:50051", token=..., root_certificates=...) as client:
    for suggestion in client.suggest("In the beginning").suggestions:
        print(suggestion.text, suggestion.probability)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

# Calls the server refused before doing anything (RESOURCE_EXHAUSTED: too many at once) or that could not
# reach it (UNAVAILABLE: a worker restarting) are tried again, within the call's deadline, after a pause
# that gRPC draws at random up to 0.1 s, 0.2 s, 0.4 s, ... 1 s: so that clients back off instead of
# piling onto a busy server. Learn and ImportHistory are not retried (they add to a history).
RETRIED = ("Suggest", "Convert", "Generate", "Type", "GetModelInfo", "Forget", "ExportHistory")
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "nextword.v1.NextWord", "method": method} for method in RETRIED],
                "retryPolicy": RETRY_POLICY,
            }
        ]
    }
)


class NextWordClient:
    """``token``: a bearer token sent with every call. TLS when ``tls`` or any certificate is given:
    ``root_certificates`` (PEM) to trust the server (default: the system's roots), and
    ``private_key`` / ``certificate_chain`` (PEM) for mutual TLS. ``retry``: try refused calls again
    with backoff (``RETRY_POLICY``)."""

    def __init__(
        self,
        target: str = "localhost:50051",
        timeout: float | None = 10.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        user: str | None = None,
        model: str = "",
        retry: bool = True,
    ) -> None:
        """``user``: the user every call names (x-nextword-user): its suggestions use and its Type
        sessions add to that user's personal history. ``model``: the served model every call asks, by
        name ("" = the server's first)."""
        options = [("grpc.enable_retries", int(retry))] + ([("grpc.service_config", SERVICE_CONFIG)] if retry else [])
        if tls or root_certificates or private_key or certificate_chain:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.NextWordStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        if user:
            self.metadata += (("x-nextword-user", user),)
        self.model = model

    def __enter__(self) -> NextWordClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def suggest(self, text: str, num_suggestions: int = 0) -> pb.SuggestResponse:
        return self.stub.Suggest(
            pb.SuggestRequest(text=text, num_suggestions=num_suggestions, model=self.model),
            timeout=self.timeout,
            wait_for_ready=True,
            metadata=self.metadata,
        )

    def generate(self, prompt: str, **params) -> Iterator[pb.GenerateResponse]:
        """Streams GenerateResponse messages; params are GenerateRequest fields (temperature, top_k, ...)."""
        return self.stub.Generate(
            pb.GenerateRequest(prompt=prompt, model=self.model, **params),
            timeout=self.timeout,
            wait_for_ready=True,
            metadata=self.metadata,
        )

    def type(self, edits: Iterable[pb.TypeRequest], timeout: float | None = None) -> Iterator[pb.TypeResponse]:
        """A typing session; the first edit names the client's model unless it names one itself."""

        def named() -> Iterator[pb.TypeRequest]:
            for index, edit in enumerate(edits):
                if index == 0 and self.model and not edit.model:
                    edit = pb.TypeRequest(model=self.model, **{f.name: v for f, v in edit.ListFields()})
                yield edit

        return self.stub.Type(named(), timeout=timeout, wait_for_ready=True, metadata=self.metadata)

    def convert(self, pinyin: str, context: str = "", num_candidates: int = 0, fuzzy: bool = False):
        """Pinyin to hanzi candidates after ``context`` (a Chinese model)."""
        request = pb.ConvertRequest(
            context=context, pinyin=pinyin, num_candidates=num_candidates, model=self.model, fuzzy=fuzzy
        )
        return self.stub.Convert(request, timeout=self.timeout, wait_for_ready=True, metadata=self.metadata)

    def info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(model=self.model), timeout=self.timeout, wait_for_ready=True, metadata=self.metadata
        )

    def learn(self, text: str) -> pb.LearnResponse:
        return self.stub.Learn(pb.LearnRequest(text=text), timeout=self.timeout, metadata=self.metadata)

    def forget(self, word: str = "", everything: bool = False) -> pb.ForgetResponse:
        """Forget ``word`` (a word, a name, Chinese characters), or with ``everything`` all of the history."""
        request = pb.ForgetRequest(word=word, everything=everything)
        return self.stub.Forget(request, timeout=self.timeout, metadata=self.metadata)

    def export_history(self) -> Iterator[str]:
        """The user's history, a line (JSON) at a time."""
        for chunk in self.stub.ExportHistory(pb.ExportHistoryRequest(), timeout=self.timeout, metadata=self.metadata):
            yield from chunk.lines.splitlines()

    def import_history(self, lines: Iterable[str], per_message: int = 500) -> pb.ImportHistoryResponse:
        def chunks() -> Iterator[pb.HistoryChunk]:
            batch: list[str] = []
            for line in lines:
                batch.append(line.rstrip("\n") + "\n")
                if len(batch) == per_message:
                    yield pb.HistoryChunk(lines="".join(batch))
                    batch = []
            if batch:
                yield pb.HistoryChunk(lines="".join(batch))

        return self.stub.ImportHistory(chunks(), timeout=self.timeout, metadata=self.metadata)

    def health(self, service: str = "") -> str:
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout, metadata=self.metadata
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
