"""Server configuration: one frozen dataclass, filled from the command line (service/__main__.py)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from service.model.pinyin_lattice import MAX_PINYIN_LETTERS

_MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class ServerConfig:
    # the served model files, "PATH" or "NAME=PATH" each; requests choose one by name, the first by default
    model: tuple[str, ...] = ("models/default.pt",)
    host: str = "[::]"
    port: int = 50051
    device: str = "auto"  # auto | cpu | cuda
    ngram: bool = True  # mix the network with the file's n-gram memory (when it has one)
    half: bool = False  # float16 weights on CUDA
    workers: int = 0  # server processes sharing the port; 0 = chosen for the machine (service/model/hardware.py)
    threads: int = 0  # torch intra-op threads per worker process; 0 = its share of the cores
    batching: bool = True  # stack concurrent requests' model steps into one forward
    max_batch_size: int = 64  # most sequences in one batched forward
    drop_ended: bool = True  # skip queued model steps whose caller cancelled or passed its deadline
    max_batch_wait_ms: float = 0.0  # wait this long for more work once a batch starts (0 = never wait)
    max_concurrent_rpcs: int = 256  # calls handled at once (a Type session is one); more: RESOURCE_EXHAUSTED
    grace: float = 10.0  # seconds in-flight calls get to finish on SIGTERM
    max_text_chars: int = 10_000  # Suggest text, Generate prompt, a Type session's text
    max_suggestions: int = 20
    max_generate_tokens: int = 512
    max_context_tokens: int = 1024  # longer text keeps its last tokens
    max_sessions: int = 256  # concurrent Type streams
    session_idle_timeout: float = 300.0  # a Type stream with no edit for this long is closed
    session_history: int = 64  # saved states per Type session (how far a delete goes back cheaply)
    max_message_bytes: int = 1 << 20
    reflection: bool = True
    tls_cert: str = ""  # PEM server certificate chain; with tls_key, the port speaks TLS only
    tls_key: str = ""  # PEM private key
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    auth_token_file: str = ""  # bearer tokens, one per line; or env NEXTWORD_AUTH_TOKEN
    health_without_auth: bool = True  # the health service answers without a token (for probes)
    metrics: bool = True  # Prometheus metrics over HTTP on metrics_port
    metrics_port: int = 9464
    log_format: str = "json"  # json: one object per line; text: for people
    log_calls: bool = True  # a log line per call; off: startup, errors and shutdown only
    history_db: str = "nextword-history.sqlite"  # SQLite file, postgresql://... URL, or "off"
    learning: bool = True  # Type sessions and Learn add to the users' histories
    history_order: int = 3  # n-gram orders 1..N learned per user
    history_max_entries: int = 20_000  # n-grams per user; the least recently used beyond are pruned
    history_half_life_days: float = 30.0  # a use counts half as much after this long
    history_max_age_days: float = 0.0  # drop n-grams not used for this long (0 = keep)
    history_flush_ms: float = 200.0  # learned counts are written at most this often
    max_pinyin_letters: int = MAX_PINYIN_LETTERS  # longest Convert pinyin or Type composition

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
