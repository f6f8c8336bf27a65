"""Split a corpus into training and test files, at random by line.

    python -m training.split ../shared/corpora/kjv/kjv.txt --out build/kjv --test-fraction 0.1 --seed 0
    -> build/kjv/train.txt (90 % of the lines) and build/kjv/test.txt (10 %)

The same split as ``training.train --val-fraction`` uses for validation
(``training.data.split_lines``), so a recipe is tuned on the validation lines
that training holds out of train.txt and judged once on test.txt.
"""

from __future__ import annotations

import os
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m training.split", __doc__.split("\n\n")[0], SplitConfig)
    args = config_from(SplitConfig, parser.parse_args(argv))
    try:
        corpus = read_corpus([args.corpus])
    except CorpusError as error:
        print(f"nextword-split: {error}", file=sys.stderr)
        return 2
    train, test = split_lines(corpus.lines, args.test_fraction, args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, lines in (("train.txt", train), ("test.txt", test)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    print(f"{args.out}/train.txt: {len(train)} lines; {args.out}/test.txt: {len(test)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
