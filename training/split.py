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

from service.model.command_line import OneLineParser, ranged
from training.data import CorpusError, read_corpus, split_lines


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m training.split", description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="UTF-8 text, one sequence per line")
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/train.txt and DIR/test.txt")
    parser.add_argument(
        "--test-fraction",
        type=ranged(float, 0.0, 0.9, low_open=True),
        default=0.1,
        help="fraction of lines for the test file (default 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
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
