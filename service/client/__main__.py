"""The command line of the Python client (python -m service.client).

    python -m service.client suggest "In the beginning"
    python -m service.client generate "And God said" --max-tokens 30 --temperature 0
    python -m service.client type          (interactive: suggestions as you type; Ctrl-D ends)
    python -m service.client info
    python -m service.client health
    python -m service.client --user ann learn notes.txt      (personal history: learn a file,
    python -m service.client --user ann forget Zelda          forget a word ("" = everything),
    python -m service.client --user ann export > ann.jsonl    export it, import it)
    python -m service.client --user ann import ann.jsonl

A secured server (docs/operations.md): --token-file (or NEXTWORD_AUTH_TOKEN) for the
bearer token, --tls-ca for the server's CA, --tls-cert/--tls-key for a client certificate.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict

from service.client import NextWordClient
from service.model.command_line import OneLineParser, add_options, config_from, option
from service.pb.nextword.v1 import nextword_pb2 as pb


def show(response: pb.SuggestResponse) -> str:
    words = "   ".join(f"{s.text} ({s.probability:.1%})" for s in response.suggestions)
    return (f"[completing {response.prefix!r}] " if response.completes_word else "") + (words or "(none)")


class TypingScreen:
    """The typed text on one line and the suggestions under it, redrawn after each answer; Tab takes the first."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.text = ""
        self.last: pb.SuggestResponse | None = None

    def taken(self) -> tuple[int, str] | None:
        """(characters to delete, text to append) that take the first suggestion, or None when there is none."""
        if self.last is None or not self.last.suggestions:
            return None
        first = self.last.suggestions[0].text
        prefix = self.last.prefix if self.last.completes_word else ""
        return len(prefix), first + " "

    def draw(self, response: pb.SuggestResponse) -> None:
        self.last = response  # the cursor is on the text's line, where the last draw left it
        self.out.write(f"\r\x1b[K> {self.text}\n\r\x1b[K  {show(response)}  (Tab takes the first)")
        self.out.write(f"\x1b[1A\r\x1b[{len(self.text) + 3}G")  # the cursor after the text
        self.out.flush()


def interactive_type(client: NextWordClient, count: int) -> None:
    """Raw keystrokes on a terminal (Backspace deletes, Tab takes a suggestion); one edit per line otherwise."""
    if not sys.stdin.isatty():
        lines = (pb.TypeRequest(append=line.rstrip("\n") or " ", num_suggestions=count) for line in sys.stdin)
        for response in client.type(lines):
            print(show(response.suggestions), flush=True)
        return
    import termios
    import tty

    screen = TypingScreen()

    def edits() -> Iterator[pb.TypeRequest]:
        settings = termios.tcgetattr(sys.stdin)
        try:
            tty.setcbreak(sys.stdin)
            while True:
                key = sys.stdin.read(1)
                if key in ("", "\x04"):
                    return
                if key in ("\x7f", "\b"):
                    screen.text = screen.text[:-1]
                    yield pb.TypeRequest(delete=1, num_suggestions=count)
                elif key == "\x15":  # Ctrl-U
                    screen.text = ""
                    yield pb.TypeRequest(reset=True, num_suggestions=count)
                elif key == "\t" and (take := screen.taken()) is not None:
                    removed, added = take
                    screen.text = screen.text[: len(screen.text) - removed] + added
                    if removed:
                        yield pb.TypeRequest(delete=removed, num_suggestions=count)
                    yield pb.TypeRequest(append=added, num_suggestions=count)
                elif key.isprintable() or key == "\n":
                    screen.text += " " if key == "\n" else key
                    yield pb.TypeRequest(append=" " if key == "\n" else key, num_suggestions=count)
        finally:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, settings)

    print("type; Tab takes the first suggestion, Backspace deletes, Ctrl-U clears, Ctrl-D ends", file=sys.stderr)
    for response in client.type(edits()):
        screen.draw(response.suggestions)
    print("\n")


LEARN_PIECE = 8000  # characters per Learn call (the server's default limit is 10,000)


def learn_pieces(text: str, size: int = LEARN_PIECE) -> list[str]:
    """The text in pieces of at most ``size`` characters, cut between lines (or, in a longer line, at a space)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            cut = line.rfind(" ", 0, size) + 1 or size
            pieces.append(line[:cut])
            line = line[cut:]
        if len(current) + len(line) > size:
            pieces.append(current)
            current = ""
        current += line
    return [piece for piece in [*pieces, current] if piece.strip()]


def read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@dataclass(frozen=True)
class Connection:
    target: str = option("localhost:50051", "server address")
    timeout: float = option(30.0, "seconds per call", low=0.0, low_open=True)
    json: bool = option(False, "print responses as JSON")
    token_file: str | None = option(None, "file with the bearer token", default_text="env NEXTWORD_AUTH_TOKEN")
    tls: bool = option(False, "connect with TLS, trusting the system's CAs")
    tls_ca: str | None = option(None, "PEM CA bundle that signed the server's certificate (implies --tls)")
    tls_cert: str | None = option(None, "PEM client certificate, for mutual TLS")
    tls_key: str | None = option(None, "PEM key of --tls-cert")
    user: str | None = option(None, "the user the calls are for (personal history)", default_text="none")
    model: str = option("", "the served model to ask, by name", default_text="the server's first")

    def client(self) -> NextWordClient:
        """A client of the server (raises OSError when a token or PEM file cannot be read)."""
        token: str | None
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        else:
            token = os.environ.get("NEXTWORD_AUTH_TOKEN", "").strip() or None
        pem = {
            name: _read(path) for name, path in (("ca", self.tls_ca), ("cert", self.tls_cert), ("key", self.tls_key))
        }
        return NextWordClient(
            self.target,
            self.timeout,
            token=token,
            tls=self.tls,
            root_certificates=pem["ca"],
            private_key=pem["key"],
            certificate_chain=pem["cert"],
            user=self.user,
            model=self.model,
        )


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _print_json(response) -> None:
    print(json.dumps(MessageToDict(response), ensure_ascii=False))


@dataclass(frozen=True)
class Suggest:
    """suggestions for the text before the cursor"""

    text: str = option(help="the text before the cursor; a half-typed last word is completed", positional=True)
    num_suggestions: int = option(0, "how many (0: the server's 3)", low=0, short="-n")

    def run(self, client: NextWordClient, connection: Connection) -> int:
        response = client.suggest(self.text, self.num_suggestions)
        _print_json(response) if connection.json else print(show(response))
        return 0


@dataclass(frozen=True)
class Generate:
    """continue a prompt, streaming the text"""

    prompt: str = option(help="the text to continue", positional=True)
    temperature: float | None = option(None, "0 is greedy", default_text="the server's 1.0")
    top_k: int = option(0, "sample from the k most probable tokens (0: all)", low=0)
    top_p: float | None = option(None, "nucleus sampling mass, in (0, 1]", default_text="the server's 1.0")
    max_tokens: int = option(0, "tokens to generate (0: the server's 64)", low=0)
    stop: tuple[str, ...] = option((), "stop before this text; repeat for several")
    seed: int | None = option(None, "the same seed gives the same text", default_text="a random one")

    def run(self, client: NextWordClient, connection: Connection) -> int:
        params = {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
        }
        for response in client.generate(self.prompt, **{k: v for k, v in params.items() if v is not None}):
            if response.HasField("finished"):
                finished = response.finished
                print(
                    f"\n[{pb.FinishReason.Name(finished.reason)}, {finished.prompt_tokens} prompt tokens, "
                    f"{finished.generated_tokens} generated]",
                    file=sys.stderr,
                )
            else:
                print(response.text, end="", flush=True)
        return 0


@dataclass(frozen=True)
class Type:
    """an interactive typing session"""

    num_suggestions: int = option(0, "suggestions per keystroke (0: the server's 3)", low=0, short="-n")

    def run(self, client: NextWordClient, connection: Connection) -> int:
        interactive_type(client, self.num_suggestions)
        return 0


@dataclass(frozen=True)
class Learn:
    """learn a text file into --user's history (- reads standard input)"""

    file: str = option(help="UTF-8 text, sent in pieces of at most 8,000 characters", positional=True)

    def run(self, client: NextWordClient, connection: Connection) -> int:
        pieces = learn_pieces(read_text(self.file))
        print(f"learned {sum(client.learn(piece).ngrams for piece in pieces)} n-grams")
        return 0


@dataclass(frozen=True)
class Forget:
    """remove a word and its n-grams from --user's history"""

    word: str = option("", "the word, a name or Chinese characters", positional=True, metavar="WORD")
    everything: bool = option(False, "remove all of the history (give no word)")

    def run(self, client: NextWordClient, connection: Connection) -> int:
        print(f"removed {client.forget(self.word, self.everything).removed} n-grams")
        return 0


@dataclass(frozen=True)
class Export:
    """print --user's history (JSON lines)"""

    def run(self, client: NextWordClient, connection: Connection) -> int:
        for line in client.export_history():
            print(line)
        return 0


@dataclass(frozen=True)
class Import:
    """add a file of exported history lines to --user's history"""

    file: str = option(help="JSON lines as export prints them (- reads standard input)", positional=True)

    def run(self, client: NextWordClient, connection: Connection) -> int:
        print(f"imported {client.import_history(read_text(self.file).splitlines()).ngrams} n-grams")
        return 0


@dataclass(frozen=True)
class Convert:
    """pinyin to hanzi candidates (a Chinese model)"""

    pinyin: str = option(help="letters: nihao, xi'an, lvse (v for ü), zhongg, nh, nihaosj", positional=True)
    context: str = option("", "the committed text before the cursor")
    num_candidates: int = option(0, "how many (0: the server's 9)", low=0, short="-n")
    fuzzy: bool = option(False, "fuzzy pinyin: z=zh, c=ch, s=sh, in=ing, en=eng")

    def run(self, client: NextWordClient, connection: Connection) -> int:
        response = client.convert(self.pinyin, self.context, self.num_candidates, self.fuzzy)
        if connection.json:
            _print_json(response)
            return 0
        for index, c in enumerate(response.candidates):
            rest = self.pinyin[c.consumed :]
            print(f"{index}. {c.text}  ({c.syllables}; {c.probability:.1%})" + (f"  + {rest}" if rest else ""))
        return 0


@dataclass(frozen=True)
class Info:
    """what model the server runs"""

    def run(self, client: NextWordClient, connection: Connection) -> int:
        info = MessageToDict(client.info(), preserving_proto_field_name=True)
        info.pop("manifest_json", None)
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0


@dataclass(frozen=True)
class Health:
    """the server's health status"""

    def run(self, client: NextWordClient, connection: Connection) -> int:
        status = client.health()
        print(status)
        return 0 if status == "SERVING" else 1


COMMANDS: dict[str, type] = {
    "suggest": Suggest,
    "generate": Generate,
    "type": Type,
    "learn": Learn,
    "forget": Forget,
    "export": Export,
    "import": Import,
    "convert": Convert,
    "info": Info,
    "health": Health,
}


def parse_args(argv: list[str] | None) -> tuple[Connection, Callable[[NextWordClient, Connection], int]]:
    """The connection's options, and the command's ``run``."""
    parser = OneLineParser(prog="nextword-client", description="Call a nextword server.")
    add_options(parser, Connection)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        add_options(commands.add_parser(name, help=command.__doc__), command)
    args = parser.parse_args(argv)
    return config_from(Connection, args), config_from(COMMANDS[args.command], args).run


def main(argv: list[str] | None = None) -> int:
    connection, run = parse_args(argv)
    try:
        client = connection.client()
    except OSError as error:
        print(f"nextword-client: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        return run(client, connection)
    except grpc.RpcError as error:
        print(f"nextword-client: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except OSError as error:
        print(f"nextword-client: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as error:
        print(f"nextword-client: the input is not UTF-8 text ({error.reason})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
