#!/usr/bin/env bash
# The default recipes, judged against the n-gram baseline on a held-out test split.
#   scripts/recipes.sh kjv   [CORPORA_DIR]   English: words, 2x256 LSTM, 10 epochs (7,060 steps)
#   scripts/recipes.sh zh    [CORPORA_DIR]   Chinese: characters, 2x512 LSTM, dropout 0.5, 10 epochs (2,080 steps)
# (--max-steps sets the length of the cosine learning-rate schedule; the 10 epochs end the run first.)
# Each: split the corpus 90/10 by line (seed 0) into train/test; train on train.txt (which holds
# out 10 % of its own lines for validation: the recipes were tuned on those, never on test.txt);
# export; evaluate the model and a Kneser-Ney/backoff n-gram (the order best on validation)
# trained on the same train.txt, on test.txt; and --learn: test.txt typed in its original order
# (KJV: book, chapter, verse) by one user whose history learns each line. Writes
# build/recipes/NAME-test.{txt,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
name=${1:?usage: scripts/recipes.sh kjv|zh [CORPORA_DIR]}
corpora=${2:-../shared/corpora}
py="$VENV/bin/python"
order=5  # the n-gram order best on validation, for both recipes
case "$name" in
    kjv) corpus="$corpora/kjv/kjv.txt"
         flags=(--tokenizer word --lowercase --vocab-size 5000 --hidden-size 256 --dropout 0.1 --epochs 10 --max-steps 9000 --eval-every 1500) ;;
    zh)  corpus="$corpora/zh-fortunes/zh-fortunes.txt"
         flags=(--tokenizer char --hidden-size 512 --dropout 0.5 --epochs 10 --max-steps 3000 --eval-every 1000) ;;
    *) echo "recipes.sh: unknown recipe '$name' (kjv or zh)" >&2; exit 2 ;;
esac
[ -f "$corpus" ] || { echo "recipes.sh: corpus not found: $corpus" >&2; exit 2; }
stage() { echo "recipes.sh [$name] $(date +%H:%M:%S) $*" >&2; }
mkdir -p build/recipes
stage "1/4 split $corpus into build/$name/train.txt and test.txt"
"$py" -m training.split "$corpus" --out "build/$name" --test-fraction 0.1 --seed 0
stage "2/4 train build/recipes/$name-run"
"$py" -m training.train --corpus "build/$name/train.txt" --out "build/recipes/$name-run" \
    --cell lstm --num-layers 2 --batch-size 32 --bptt 35 --lr 3e-3 \
    --seed 0 --device cpu "${flags[@]}"
stage "3/4 export build/recipes/$name.pt"
"$py" -m training.export "build/recipes/$name-run" --out "build/recipes/$name.pt"
stage "4/4 evaluate on build/$name/test.txt against a $order-gram"
"$py" -m training.evaluate "build/recipes/$name.pt" --text "build/$name/test.txt" \
    --baseline ngram --train "build/$name/train.txt" --order "$order" --learn \
    --json "build/recipes/$name-test.json" | tee "build/recipes/$name-test.txt"
stage "done: build/recipes/$name-test.txt"
