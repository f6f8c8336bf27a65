"""Server configuration: one frozen dataclass whose fields carry their flags' help; the command line
(service/__main__.py) is built from it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from service.model.command_line import option
from service.model.pinyin_lattice import MAX_PINYIN_LETTERS

_MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class ServerConfig:
    # the served model files, "PATH" or "NAME=PATH" each; requests choose one by name, the first by default
    model: tuple[str, ...] = option(
        ("models/default.pt",),
        "an exported model file (nextword-export), as PATH or NAME=PATH; repeat it to serve several (requests "
        "choose one by name, the first by default; a name defaults to the file's stem)",
        metavar="[NAME=]PATH",
    )
    host: str = option(
        "127.0.0.1",
        "address to listen on: 127.0.0.1 is this machine only; [::] every interface (then personal history "
        "needs --auth-token-file or --trust-user-header)",
    )
    port: int = option(50051, "port to listen on (0 = any free port)", low=0)
    http_port: int | None = option(
        None,
        "also serve HTTP/JSON, Server-Sent Events, WebSockets and the demo page on this port (0: any free port)",
        low=0,
        default_text="off",
    )
    cors_origin: tuple[str, ...] = option(
        (),
        "a web origin (https://app.example) whose pages may call the HTTP front; repeat for several",
        metavar="ORIGIN",
    )
    admin_port: int | None = option(
        None,
        "serve the admin port here: list, add, reload and remove models at run time; every call needs a token "
        "bound to admin (docs/operations.md; 0: any free port)",
        low=0,
        default_text="off",
    )
    watch_models: bool = option(
        False, "reload a model when its file changes (as SIGHUP does: loaded and warmed beside the old one, swapped in)"
    )
    device: str = option("auto", "auto picks cuda when available", choices=["auto", "cpu", "cuda"])
    ngram: bool = option(
        True, "serve the network mixed with the model file's n-gram memory (--no-ngram: the network alone)"
    )
    half: bool = option(False, "float16 weights on CUDA")
    workers: int = option(
        0,
        "server processes sharing the port (SO_REUSEPORT), each with its own model; 0 = one per core, up to 4 "
        "on CPU and 16 on CUDA (docs/serving.md); 1 = a single process",
        low=0,
    )
    threads: int = option(
        0,
        "intra-op threads for each process's model worker (0 = torch's default divided by --workers); with "
        "batching, request threads use one; with one, recurrent layers run on ATen's kernels, not oneDNN's",
        low=0,
    )
    batching: bool = option(
        True,
        "stack concurrent requests' model steps into one forward (on CUDA, --no-batching runs one call's step "
        "per forward, on the model worker thread)",
    )
    max_batch_size: int = option(64, "most sequences in one batched forward", low=0)
    drop_ended: bool = option(
        True, "with batching, skip a queued model step whose caller cancelled or passed its deadline"
    )
    max_batch_wait_ms: float = option(0.0, "wait this long for more work once a batch starts (0 = never wait)", low=0)
    max_concurrent_rpcs: int = option(
        256, "calls handled at once, a Type session counting as one; more get RESOURCE_EXHAUSTED", low=0
    )
    grace: float = option(10.0, "seconds in-flight calls get to finish on SIGTERM", low=0)
    max_text_chars: int = option(
        10_000, "longest Suggest text, Generate prompt or Type session text, in characters", low=0
    )
    max_suggestions: int = option(20, "most suggestions one request may ask for", low=0)
    max_generate_tokens: int = option(512, "most tokens one Generate may ask for", low=0)
    max_context_tokens: int = option(1024, "longer text keeps its last tokens", low=0)
    max_sessions: int = option(256, "concurrent Type sessions; more get RESOURCE_EXHAUSTED", low=0)
    session_idle_timeout: float = option(300.0, "seconds a Type session may go without an edit", low=0)
    session_history: int = option(64, "saved states per Type session (how far back a delete is free)", low=0)
    max_message_bytes: int = option(1 << 20, "largest request or response message", low=0)
    reflection: bool = option(True, "gRPC server reflection (for grpcurl)")
    tls_cert: str = option("", "PEM certificate chain; with --tls-key the port accepts TLS only")
    tls_key: str = option("", "PEM private key for --tls-cert")
    tls_client_ca: str = option("", "PEM CA bundle; clients must show a certificate it signed (mutual TLS)")
    auth_token_file: str = option(
        "", "file of bearer tokens, one per line (or set NEXTWORD_AUTH_TOKEN); calls without one get UNAUTHENTICATED"
    )
    trust_user_header: bool = option(
        False,
        "take x-nextword-user as given without bearer tokens, on an address beyond loopback: only behind a "
        "proxy that authenticates every caller and sets the header itself",
    )
    health_without_auth: bool = option(True, "let the health service answer without a token")
    max_watch_streams: int = option(1024, "open health Watch streams; more get RESOURCE_EXHAUSTED", low=1)
    metrics: bool = option(True, "serve Prometheus metrics over HTTP")
    metrics_port: int = option(9464, "port for /metrics (0 = any free port)", low=0)
    log_format: str = option("json", "json (one object per line) or text", choices=["json", "text"])
    log_calls: bool = option(
        True, "a log line per call (method, status, duration, request id); errors are logged either way"
    )
    history_db: str = option(
        "nextword-history.sqlite",
        "where personal histories live: a SQLite file, a postgresql://... URL, or off (docs/history.md)",
    )
    learning: bool = option(
        True, "Type sessions and Learn add to the history of the user a call names (--no-learning: read only)"
    )
    history_order: int = option(4, "n-gram orders 1..N learned per user", low=0)
    history_max_entries: int = option(20_000, "n-grams kept per user; the least recently used beyond are pruned", low=0)
    history_half_life_days: float = option(30.0, "a use counts half as much after this many days", low=0)
    history_max_age_days: float = option(0.0, "drop n-grams not used for this many days (0 = keep them)", low=0)
    history_flush_ms: float = option(
        200.0, "learned counts are written to the database at most this often (a SIGTERM writes them)", low=0
    )
    history_read_timeout_ms: float = option(
        50.0,
        "a call waits at most this long for a user's history from the database; past it (or while the database "
        "is down) it is answered without",
        low=0.0,
        low_open=True,
    )
    import_idle_timeout: float = option(
        30.0, "seconds an ImportHistory stream may go without a message", low=0.0, low_open=True
    )
    max_pinyin_letters: int = option(
        MAX_PINYIN_LETTERS, "most letters in a Convert request's pinyin or a Type session's composition", low=0
    )

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # one path given as a string
            object.__setattr__(self, "model", (self.model,))

    @property
    def models(self) -> list[tuple[str, str]]:
        """(name, path) of each served model; a name defaults to the file's stem (models/zh.pt -> zh)."""
        out: list[tuple[str, str]] = []
        for spec in self.model:
            name, sep, path = spec.partition("=")
            if not sep or "/" in name or not name:
                name, path = os.path.splitext(os.path.basename(spec))[0], spec
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(f"model name {name!r}: use 1-64 of A-Za-z0-9._- (--model NAME=PATH)")
            if name in (n for n, _ in out):
                raise ValueError(f"two models are named {name!r}: name them apart with --model NAME=PATH")
            out.append((name, path))
        if not out:
            raise ValueError("no model to serve: give --model PATH")
        return out
