"""python -m service --model model.pt [--host] [--port] [--device] ...  (console script nextword-serve)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from service.api.config import ServerConfig
from service.api.logs import configure_logging
from service.model.artifact import ArtifactError
from service.model.command_line import OneLineParser, ranged

HELP = {
    "model": "an exported model file (nextword-export), as PATH or NAME=PATH; repeat it to serve several "
    "(requests choose one by name, the first by default; a name defaults to the file's stem)",
    "host": "address to listen on ([::] = every interface)",
    "port": "port to listen on (0 = any free port)",
    "device": "auto picks cuda when available",
    "ngram": "serve the network mixed with the model file's n-gram memory (--no-ngram: the network alone)",
    "half": "float16 weights on CUDA",
    "workers": "server processes sharing the port (SO_REUSEPORT), each with its own model; "
    "0 = one per core, up to 4 on CPU and 16 on CUDA (docs/serving.md); 1 = a single process",
    "threads": "intra-op threads for each process's model worker (0 = torch's default divided by --workers); "
    "with batching, request threads use one; with one, recurrent layers run on ATen's kernels, not oneDNN's",
    "batching": "stack concurrent requests' model steps into one forward "
    "(on CUDA, --no-batching runs one call's step per forward, on the model worker thread)",
    "max_batch_size": "most sequences in one batched forward",
    "drop_ended": "with batching, skip a queued model step whose caller cancelled or passed its deadline",
    "max_batch_wait_ms": "wait this long for more work once a batch starts (0 = never wait)",
    "max_concurrent_rpcs": "calls handled at once, a Type session counting as one; more get RESOURCE_EXHAUSTED",
    "grace": "seconds in-flight calls get to finish on SIGTERM",
    "max_text_chars": "longest Suggest text, Generate prompt or Type session text, in characters",
    "max_suggestions": "most suggestions one request may ask for",
    "max_generate_tokens": "most tokens one Generate may ask for",
    "max_context_tokens": "longer text keeps its last tokens",
    "max_sessions": "concurrent Type sessions; more get RESOURCE_EXHAUSTED",
    "session_idle_timeout": "seconds a Type session may go without an edit",
    "session_history": "saved states per Type session (how far back a delete is free)",
    "max_message_bytes": "largest request or response message",
    "reflection": "gRPC server reflection (for grpcurl)",
    "tls_cert": "PEM certificate chain; with --tls-key the port accepts TLS only",
    "tls_key": "PEM private key for --tls-cert",
    "tls_client_ca": "PEM CA bundle; clients must show a certificate it signed (mutual TLS)",
    "auth_token_file": "file of bearer tokens, one per line (or set NEXTWORD_AUTH_TOKEN); "
    "calls without one get UNAUTHENTICATED",
    "health_without_auth": "let the health service answer without a token",
    "metrics": "serve Prometheus metrics over HTTP",
    "metrics_port": "port for /metrics (0 = any free port)",
    "log_format": "json (one object per line) or text",
    "log_calls": "a log line per call (method, status, duration, request id); errors are logged either way",
    "history_db": "where personal histories live: a SQLite file, a postgresql://... URL, or off (docs/history.md)",
    "learning": "Type sessions and Learn add to the history of the user a call names (--no-learning: read only)",
    "history_order": "n-gram orders 1..N learned per user",
    "history_max_entries": "n-grams kept per user; the least recently used beyond are pruned",
    "history_half_life_days": "a use counts half as much after this many days",
    "history_max_age_days": "drop n-grams not used for this many days (0 = keep them)",
    "history_flush_ms": "learned counts are written to the database at most this often (a SIGTERM writes them)",
    "max_pinyin_letters": "most letters in a Convert request's pinyin or a Type session's composition",
}


CHOICES = {"device": ["auto", "cpu", "cuda"], "log_format": ["json", "text"]}


def parse_args(argv: list[str] | None) -> ServerConfig:
    parser = OneLineParser(prog="nextword-serve", description="Serve a nextword model over gRPC.")
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        text = f"{HELP[field.name]} (default {default})"
        if field.name == "model":
            parser.add_argument(flag, action="append", metavar="[NAME=]PATH", help=text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif field.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[field.name], default=default, help=text)
        elif isinstance(default, (int, float)):
            parser.add_argument(flag, type=ranged(type(default), 0), default=default, help=text)
        else:
            parser.add_argument(flag, default=default, help=text)
    values = vars(parser.parse_args(argv))
    values["model"] = tuple(values["model"] or defaults.model)
    config = ServerConfig(**values)
    try:
        config.models  # noqa: B018 - names checked here, one line on the command line
    except ValueError as error:
        parser.error(str(error))
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_format)
    from service.api.launch import serve

    try:
        serve(config)
    except (ArtifactError, ValueError, OSError) as error:
        print(f"nextword-serve: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
