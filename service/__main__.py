"""python -m service --model model.pt [--host] [--port] [--device] ...  (console script nextword-serve)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from service.artifact import ArtifactError
from service.cli import OneLineParser, ranged
from service.config import ServerConfig

HELP = {
    "model": "the exported model file (nextword-export)",
    "host": "address to listen on ([::] = every interface)",
    "port": "port to listen on (0 = any free port)",
    "device": "auto picks cuda when available",
    "half": "float16 weights on CUDA",
    "threads": "torch intra-op threads (0 = torch's default)",
    "batching": "stack concurrent requests' model steps into one forward",
    "max_batch_size": "most sequences in one batched forward",
    "max_batch_wait_ms": "wait this long for more work once a batch starts (0 = never wait)",
    "workers": "gRPC handler threads",
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
}


def parse_args(argv: list[str] | None) -> ServerConfig:
    parser = OneLineParser(prog="nextword-serve", description="Serve a nextword model over gRPC.")
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        text = f"{HELP[field.name]} (default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif field.name == "device":
            parser.add_argument(flag, choices=["auto", "cpu", "cuda"], default=default, help=text)
        elif isinstance(default, (int, float)):
            parser.add_argument(flag, type=ranged(type(default), 0), default=default, help=text)
        else:
            parser.add_argument(flag, default=default, help=text)
    return ServerConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.server import serve

    try:
        serve(config)
    except (ArtifactError, ValueError, OSError) as error:
        print(f"nextword-serve: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
