"""Split a corpus into training and test files, at random by line, or at a line.

    python -m training.split ../shared/corpora/kjv/kjv.txt --out build/kjv --test-fraction 0.1 --seed 0
    -> build/kjv/train.txt (90 % of the lines) and build/kjv/test.txt (10 %)
    python -m training.split ../shared/corpora/kjv/kjv.txt --out build/adapt/kjv --at-line 23146
    -> train.txt: the lines before line 23,146 (the Old Testament), test.txt: the rest, in order

    python -m training.split ../shared/corpora/zh-fortunes/zh-fortunes.txt --out build/adapt/zh \
        --test-source '《谚语》$'
    -> test.txt: the lines where the pattern matches (the proverbs), in order and without the matched
       text (the source tag); train.txt: every other line

With ``--at-line`` or ``--test-source`` (counted as in the file, blank lines included), the test file keeps the text's
order: what an adaptation benchmark types, one line after another.

The same split as ``training.train --val-fraction`` uses for validation
(``training.data.split_lines``), so a recipe is tuned on the validation lines
that training holds out of train.txt and judged once on test.txt.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from service.model.command_line import build_parser, config_from, option
from training.data import CorpusError, read_corpus, split_lines


@dataclass(frozen=True)
class SplitConfig:
    corpus: str = option(help="UTF-8 text, one sequence per line", positional=True)
    out: str = option(help="writes DIR/train.txt and DIR/test.txt", required=True, metavar="DIR")
    test_fraction: float = option(0.1, "fraction of lines for the test file", low=0.0, high=0.9, low_open=True)
    seed: int = option(0, "random seed")
    at_line: int = option(0, "split in order instead: test.txt from this line of the file (1-based) on", low=0)
    test_source: str = option(
        "", "split by source instead: test.txt holds the lines this regular expression matches, less the match"
    )


def split_at(path: str, line: int) -> tuple[list[str], list[str]]:
    """(the non-empty lines before ``line`` of the file, those from it on), each stripped and in order."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if line > len(lines):
        raise CorpusError(f"{path} has {len(lines)} lines; --at-line {line} is past its end")
    train = [text.strip() for text in lines[: line - 1] if text.strip()]
    test = [text.strip() for text in lines[line - 1 :] if text.strip()]
    if not train or not test:
        raise CorpusError(f"--at-line {line} leaves no text on one side of {path}")
    return train, test


def split_source(path: str, pattern: str) -> tuple[list[str], list[str]]:
    """(the lines ``pattern`` does not match, those it matches less the match), each stripped, in order."""
    found = re.compile(pattern)
    train: list[str] = []
    test: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if not text:
                continue
            if found.search(text):
                rest = found.sub("", text).strip()
                if rest:
                    test.append(rest)
            else:
                train.append(text)
    if not train or not test:
        raise CorpusError(f"--test-source {pattern!r} leaves no text on one side of {path}")
    return train, test


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m training.split", __doc__.split("\n\n")[0], SplitConfig)
    args = config_from(SplitConfig, parser.parse_args(argv))
    try:
        if args.at_line and args.test_source:
            raise CorpusError("give --at-line or --test-source, not both")
        if args.at_line:
            train, test = split_at(args.corpus, args.at_line)
        elif args.test_source:
            train, test = split_source(args.corpus, args.test_source)
        else:
            train, test = split_lines(read_corpus([args.corpus]).lines, args.test_fraction, args.seed)
    except (CorpusError, OSError, UnicodeDecodeError, re.error) as error:
        print(f"nextword-split: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for name, lines in (("train.txt", train), ("test.txt", test)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    print(f"{args.out}/train.txt: {len(train)} lines; {args.out}/test.txt: {len(test)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
