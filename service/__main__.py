"""python -m service --model model.pt [--host] [--port] [--device] ...  (console script nextword-serve)."""

from __future__ import annotations

import sys

from service.api.config import ServerConfig
from service.api.logs import configure_logging
from service.model.artifact import ArtifactError
from service.model.command_line import build_parser, config_from


def parse_args(argv: list[str] | None) -> ServerConfig:
    parser = build_parser("nextword-serve", "Serve a nextword model over gRPC.", ServerConfig)
    config = config_from(ServerConfig, parser.parse_args(argv))
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
