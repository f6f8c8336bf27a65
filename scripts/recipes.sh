#!/usr/bin/env bash
# The default recipes, judged against the n-gram baseline on a held-out test split.
#   scripts/recipes.sh kjv     [CORPORA_DIR]   English: words, 2x512 LSTM, dropout auto (0.25 here), 10 epochs (7,060 steps,
#                                              the cosine schedule over all of them), exported with float16 weights
#   scripts/recipes.sh zh      [CORPORA_DIR]   Chinese: characters, 2x512 LSTM, dropout auto (0.5 here), 10 epochs (2,080 steps),
#                                              exported with int8 weights (a conversion runs a forward per syllable)
#   scripts/recipes.sh zh-word [CORPORA_DIR]   Chinese: jieba words (12,000: every character and the
#                                              frequent words), otherwise as zh
#   scripts/recipes.sh --build zh CORPUS OUT   a recipe trained on all of CORPUS (its own 10 % held out for
#                                              validation) and exported to OUT: what `make zh-model` runs
#   scripts/recipes.sh adapt   [CORPORA_DIR]   adaptation: a model trained on one kind of text, typed on
#                                              another by one user who learns (adapt-kjv, adapt-zh: one of them)
# (zh: --max-steps sets the length of the cosine learning-rate schedule, and the 10 epochs end the run first;
#  kjv: the schedule spans the 10 epochs.)
# Each evaluation: split the corpus 90/10 by line (seed 0) into train/test; train on train.txt (which
# holds out 10 % of its own lines for validation: the recipes were tuned on those, never on test.txt);
# export; evaluate the model and a Kneser-Ney/backoff n-gram (the order best on validation) trained on
# the same train.txt, on test.txt; and --learn: test.txt typed in its original order (KJV: book,
# chapter, verse) by one user whose history learns each line, with the fixed weights and with the weights
# fitted to the user as they type (--learn-rule online, as served). The Chinese recipes also convert
# test.txt back from its pinyin (nextword-eval --pinyin). Writes build/recipes/NAME-test.{txt,json}
# (and NAME-pinyin.{txt,json}).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
py="$VENV/bin/python"
build=""
if [ "${1:-}" = "--build" ]; then
    build=1
    shift
    [ $# -eq 3 ] || { echo "usage: scripts/recipes.sh --build zh|zh-word|kjv CORPUS OUT" >&2; exit 2; }
fi
name=${1:?usage: scripts/recipes.sh kjv|zh|zh-word|adapt|adapt-kjv|adapt-zh [CORPORA_DIR]}
corpora=${2:-../shared/corpora}
order=5  # the n-gram order best on validation, for every recipe
zh=(--hidden-size 512 --dropout auto --epochs 10 --max-steps 3000 --eval-every 1000)
kjv_flags=(--tokenizer word --lowercase --vocab-size 5000 --hidden-size 512 --dropout auto --epochs 10 --eval-every 1500)
export_flags=()
if [[ "$name" == adapt* ]]; then
    exec scripts/adapt.sh "${name#adapt}" "$corpora"
fi
# the n-gram memory: order 8 for kjv and zh, chosen on their validation lines (docs/evaluation.md)
case "$name" in
    kjv) corpus="$corpora/kjv/kjv.txt"
         flags=("${kjv_flags[@]}") export_flags=(--quantize float16 --ngram-order 8) ;;
    zh)  corpus="$corpora/zh-fortunes/zh-fortunes.txt"
         flags=(--tokenizer char "${zh[@]}") export_flags=(--quantize int8 --ngram-order 8) ;;
    zh-word) corpus="$corpora/zh-fortunes/zh-fortunes.txt"
         flags=(--tokenizer jieba --vocab-size 12000 "${zh[@]}") export_flags=(--quantize int8) ;;
    *) echo "recipes.sh: unknown recipe '$name' (kjv, zh or zh-word)" >&2; exit 2 ;;
esac
train() {  # train CORPUS RUN_DIR
    "$py" -m training.train --corpus "$1" --out "$2" \
        --cell lstm --num-layers 2 --batch-size 32 --bptt 35 --lr 3e-3 \
        --seed 0 --device cpu "${flags[@]}"
}
if [ -n "$build" ]; then
    corpus=$2 out=$3
    [ -f "$corpus" ] || { echo "recipes.sh: corpus not found: $corpus" >&2; exit 2; }
    run="build/recipes/$name-build-run"
    echo "recipes.sh [$name] $(date +%H:%M:%S) training on $corpus into $run" >&2
    train "$corpus" "$run"
    "$py" -m training.export "$run" --out "$out" "${export_flags[@]}"
    echo "recipes.sh [$name] $(date +%H:%M:%S) done: $out" >&2
    exit 0
fi
[ -f "$corpus" ] || { echo "recipes.sh: corpus not found: $corpus" >&2; exit 2; }
stage() { echo "recipes.sh [$name] $(date +%H:%M:%S) $*" >&2; }
mkdir -p build/recipes
split="build/${name%-word}"  # zh and zh-word share one split
stage "1/4 split $corpus into $split/train.txt and test.txt"
"$py" -m training.split "$corpus" --out "$split" --test-fraction 0.1 --seed 0
stage "2/4 train build/recipes/$name-run"
train "$split/train.txt" "build/recipes/$name-run"
stage "3/4 export build/recipes/$name.pt"
"$py" -m training.export "build/recipes/$name-run" --out "build/recipes/$name.pt" "${export_flags[@]}"
stage "4/4 evaluate on $split/test.txt against a $order-gram"
"$py" -m training.evaluate "build/recipes/$name.pt" --text "$split/test.txt" \
    --baseline ngram --train "$split/train.txt" --order "$order" --learn --learn-rule online \
    --json "build/recipes/$name-test.json" | tee "build/recipes/$name-test.txt"
if [ "$name" != kjv ]; then
    stage "4/4 convert $split/test.txt back from its pinyin"
    "$py" -m training.evaluate "build/recipes/$name.pt" --text "$split/test.txt" --pinyin \
        --baseline ngram --train "$split/train.txt" --order "$order" \
        --json "build/recipes/$name-pinyin.json" | tee "build/recipes/$name-pinyin.txt"
fi
stage "done: build/recipes/$name-test.txt"
