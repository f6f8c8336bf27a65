#!/usr/bin/env bash
# Rebuild models/default.pt from the committed King James text (public domain) with the kjv recipe's
# settings (scripts/recipes.sh): word tokens (5,000, lower-cased, shown as written), 2x512 LSTM, dropout
# auto, 10 epochs, seed 0, float16 weights in the file, and an order-8 n-gram memory (the order best on the
# recipe's validation lines).
# Deterministic on a given machine: fixed seed, fixed number of steps (no time budget).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build models
gzip -dc data/kjv/kjv.txt.gz > build/kjv.txt
exec scripts/recipes.sh --build kjv build/kjv.txt models/default.pt
