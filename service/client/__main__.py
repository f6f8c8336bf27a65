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

A secured server (see README, security): --token-file (or NEXTWORD_AUTH_TOKEN) for the
bearer token, --tls-ca for the server's CA, --tls-cert/--tls-key for a client certificate.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import grpc
from google.protobuf.json_format import MessageToDict

from service.client import NextWordClient
from service.model.command_line import OneLineParser
from service.pb.nextword.v1 import nextword_pb2 as pb


def show(response: pb.SuggestResponse) -> str:
    words = "   ".join(f"{s.text} ({s.probability:.1%})" for s in response.suggestions)
    return (f"[completing {response.prefix!r}] " if response.completes_word else "") + (words or "(none)")


def interactive_type(client: NextWordClient, count: int) -> None:
    """Raw keystrokes on a terminal (Backspace deletes); one edit per line otherwise."""

    def edits() -> Iterator[pb.TypeRequest]:
        if not sys.stdin.isatty():
            for line in sys.stdin:
                yield pb.TypeRequest(append=line.rstrip("\n") or " ", num_suggestions=count)
            return
        import termios
        import tty

        settings = termios.tcgetattr(sys.stdin)
        try:
            tty.setcbreak(sys.stdin)
            while True:
                key = sys.stdin.read(1)
                if key in ("", "\x04"):
                    return
                if key in ("\x7f", "\b"):
                    yield pb.TypeRequest(delete=1, num_suggestions=count)
                elif key == "\x15":  # Ctrl-U
                    yield pb.TypeRequest(reset=True, num_suggestions=count)
                elif key.isprintable() or key == "\n":
                    yield pb.TypeRequest(append=" " if key == "\n" else key, num_suggestions=count)
        finally:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, settings)

    print("type; Backspace deletes, Ctrl-U clears, Ctrl-D ends", file=sys.stderr)
    for response in client.type(edits()):
        if sys.stdout.isatty():
            print(f"\r\x1b[K{show(response.suggestions)}", end="", flush=True)
        else:
            print(show(response.suggestions), flush=True)
    print()


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


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="nextword-client", description="Call a nextword server.")
    parser.add_argument("--target", default="localhost:50051", help="server address (default localhost:50051)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    parser.add_argument("--json", action="store_true", help="print responses as JSON")
    parser.add_argument("--token-file", help="file with the bearer token (default: env NEXTWORD_AUTH_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate (implies --tls)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--user", help="the user the calls are for (personal history; default: none)")
    parser.add_argument("--model", default="", help="the served model to ask, by name (default: the server's first)")
    commands = parser.add_subparsers(dest="command", required=True)
    suggest = commands.add_parser("suggest", help="suggestions for the text before the cursor")
    suggest.add_argument("text", help="the text before the cursor; a half-typed last word is completed")
    suggest.add_argument("-n", "--num-suggestions", type=int, default=0, help="how many (default 0: the server's 3)")
    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--temperature", type=float, help="0 is greedy (default: the server's 1.0)")
    generate.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most probable tokens (default 0: all)"
    )
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1] (default: the server's 1.0)")
    generate.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (default 0: the server's 64)")
    generate.add_argument("--stop", action="append", default=[], help="stop before this text; repeat for several")
    generate.add_argument("--seed", type=int, help="the same seed gives the same text (default: a random one)")
    typing = commands.add_parser("type", help="an interactive typing session")
    typing.add_argument(
        "-n", "--num-suggestions", type=int, default=0, help="suggestions per keystroke (default 0: the server's 3)"
    )
    learn = commands.add_parser("learn", help="learn a text file into --user's history (- reads standard input)")
    learn.add_argument("file", help="UTF-8 text, sent in pieces of at most 8,000 characters")
    forget = commands.add_parser("forget", help="remove a word and its n-grams from --user's history")
    forget.add_argument("word", help='the word; "" removes all of the history')
    commands.add_parser("export", help="print --user's history (JSON lines)")
    importing = commands.add_parser("import", help="add a file of exported history lines to --user's history")
    importing.add_argument("file", help="JSON lines as export prints them (- reads standard input)")
    convert = commands.add_parser("convert", help="pinyin to hanzi candidates (a Chinese model)")
    convert.add_argument("pinyin", help="letters: nihao, xi'an, lvse (v for ü), zhongg, nh, nihaosj")
    convert.add_argument("--context", default="", help="the committed text before the cursor")
    convert.add_argument("-n", "--num-candidates", type=int, default=0, help="how many (default 0: the server's 9)")
    convert.add_argument("--fuzzy", action="store_true", help="fuzzy pinyin: z=zh, c=ch, s=sh, in=ing, en=eng")
    commands.add_parser("info", help="what model the server runs")
    commands.add_parser("health", help="the server's health status")
    args = parser.parse_args(argv)

    try:
        token = (
            open(args.token_file, encoding="utf-8").read().strip()
            if args.token_file
            else os.environ.get("NEXTWORD_AUTH_TOKEN", "").strip() or None
        )
        pem = {
            name: open(path, "rb").read() if path else None
            for name, path in (("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key))
        }
    except OSError as error:
        print(f"nextword-client: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    client = NextWordClient(
        args.target,
        args.timeout,
        token=token,
        tls=args.tls,
        root_certificates=pem["ca"],
        private_key=pem["key"],
        certificate_chain=pem["cert"],
        user=args.user,
        model=args.model,
    )
    try:
        if args.command == "suggest":
            response = client.suggest(args.text, args.num_suggestions)
            print(json.dumps(MessageToDict(response), ensure_ascii=False) if args.json else show(response))
        elif args.command == "generate":
            params = {
                k: v
                for k, v in dict(
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    max_tokens=args.max_tokens,
                    stop=args.stop,
                    seed=args.seed,
                ).items()
                if v is not None
            }
            for response in client.generate(args.prompt, **params):
                if response.HasField("finished"):
                    finished = response.finished
                    print(
                        f"\n[{pb.FinishReason.Name(finished.reason)}, {finished.prompt_tokens} prompt tokens, "
                        f"{finished.generated_tokens} generated]",
                        file=sys.stderr,
                    )
                else:
                    print(response.text, end="", flush=True)
        elif args.command == "convert":
            response = client.convert(args.pinyin, args.context, args.num_candidates, args.fuzzy)
            if args.json:
                print(json.dumps(MessageToDict(response), ensure_ascii=False))
            else:
                for index, c in enumerate(response.candidates):
                    rest = args.pinyin[c.consumed :]
                    print(f"{index}. {c.text}  ({c.syllables}; {c.probability:.1%})" + (f"  + {rest}" if rest else ""))
        elif args.command == "type":
            interactive_type(client, args.num_suggestions)
        elif args.command in ("learn", "import"):
            text = read_text(args.file)
            if args.command == "learn":
                pieces = learn_pieces(text)
                print(f"learned {sum(client.learn(piece).ngrams for piece in pieces)} n-grams")
            else:
                print(f"imported {client.import_history(text.splitlines()).ngrams} n-grams")
        elif args.command == "forget":
            print(f"removed {client.forget(args.word).removed} n-grams")
        elif args.command == "export":
            for line in client.export_history():
                print(line)
        elif args.command == "info":
            info = MessageToDict(client.info(), preserving_proto_field_name=True)
            info.pop("manifest_json", None)
            print(json.dumps(info, indent=2, ensure_ascii=False))
        elif args.command == "health":
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
    except grpc.RpcError as error:
        print(f"nextword-client: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except OSError as error:
        print(f"nextword-client: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError:
        print(f"nextword-client: {args.file} is not UTF-8 text", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
