#!/usr/bin/env bash
# The adaptation benchmark: a model trained on one kind of text, typed on another, in order, by one user whose
# personal history learns each line after it is typed (nextword-eval --learn). Run by `scripts/recipes.sh adapt`.
#   scripts/adapt.sh ""|-kjv|-zh [CORPORA_DIR]
# kjv: trained on the Old Testament (90 % of its verses, at random; the other 10 % are the same-domain check),
#      typed: the New Testament in book order (Matthew 1:1 is line 23,146 of kjv.txt).
# zh:  trained on zh-fortunes less its proverbs (《谚语》: 746 lines; 90 % of the rest), typed: the proverbs in
#      the file's order, without their source tag. Poems, classical prose and sayings against folk proverbs.
# The first 10 % of the typed lines fit the history's weights (--fit-lines); every table scores the rest, with
# the rule served before (suggestions re-ranked) and a 5-gram built on the same training text beside it. The
# user types and learns every line; of the New Testament every 4th line is scored, of the Old every 2nd (the
# five scorers of 7,162 lines would take hours on two cores).
# Writes build/adapt/*.txt and *.json. For a quick run on other text (the test suite's tiny corpora):
# ADAPT_OUT (the folder), ADAPT_KJV_AT (the first typed line of kjv.txt), ADAPT_TRAIN (training flags that
# replace the recipe's), ADAPT_EVAL (more nextword-eval flags).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
py="$VENV/bin/python"
which=${1:-}
corpora=${2:-../shared/corpora}
order=5
read -r -a tuned <<< "${ADAPT_TRAIN:-}"
read -r -a more <<< "${ADAPT_EVAL:-}"
common=(--cell lstm --num-layers 2 --batch-size 32 --bptt 35 --lr 3e-3 --seed 0 --device cpu)
out=${ADAPT_OUT:-build/adapt}
mkdir -p "$out"
stage() { echo "adapt.sh $(date +%H:%M:%S) $*" >&2; }
fitted() { "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["learning"]["history_weights"])' "$1"; }
tenth() { echo $(( $(grep -c . "$1") / 10 )); }

build() {  # build NAME TRAIN EXPORT_FLAGS... : train on TRAIN and export build/adapt/NAME.pt (unless it exists)
    local name=$1 train=$2
    shift 2
    if [ ! -f "$out/$name.pt" ]; then
        stage "$name: train on $train"
        "$py" -m training.train --corpus "$train" --out "$out/$name-run" "${common[@]}" "${flags[@]}" "${tuned[@]}"
        stage "$name: export $out/$name.pt"
        "$py" -m training.export "$out/$name-run" --out "$out/$name.pt" "$@"
    fi
}

split() {  # split NAME CORPUS REST SPLIT_FLAGS...: NAME-split/{train,test}.txt by the flags, then REST/ 90/10
    local name=$1 corpus=$2 rest=$3
    shift 3
    [ -f "$corpus" ] || { echo "adapt.sh: corpus not found: $corpus" >&2; exit 2; }
    stage "$name: split what is typed from the training text"
    "$py" -m training.split "$corpus" --out "$out/$name-split" "$@"
    "$py" -m training.split "$out/$name-split/train.txt" --out "$out/$rest" --test-fraction 0.1 --seed 0
}

if [ -z "$which" ] || [ "$which" = -kjv ]; then
    split kjv "$corpora/kjv/kjv.txt" kjv-ot --at-line "${ADAPT_KJV_AT:-23146}"
    flags=(--tokenizer word --lowercase --vocab-size 5000 --hidden-size 256 --dropout auto --epochs 10 --max-steps 9000 --eval-every 1500)
    build kjv "$out/kjv-ot/train.txt" --ngram-order 8
    stage "kjv: type the New Testament"
    "$py" -m training.evaluate "$out/kjv.pt" --text "$out/kjv-split/test.txt" --learn --learn-rule all \
        --fit-lines "$(tenth "$out/kjv-split/test.txt")" --score-every 4 --baseline ngram --train "$out/kjv-ot/train.txt" \
        --order "$order" "${more[@]}" --json "$out/kjv-nt.json" | tee "$out/kjv-nt.txt"
    stage "kjv: the same domain: held-out Old Testament verses, with the weights fitted on the New"
    "$py" -m training.evaluate "$out/kjv.pt" --text "$out/kjv-ot/test.txt" --learn --learn-rule all \
        --history-weights "$(fitted "$out/kjv-nt.json")" --score-every 2 --baseline ngram --train "$out/kjv-ot/train.txt" \
        --order "$order" "${more[@]}" --json "$out/kjv-ot.json" | tee "$out/kjv-ot.txt"
fi
if [ -z "$which" ] || [ "$which" = -zh ]; then
    split zh "$corpora/zh-fortunes/zh-fortunes.txt" zh-rest --test-source '《谚语》$'
    flags=(--tokenizer char --hidden-size 512 --dropout auto --epochs 10 --max-steps 3000 --eval-every 1000)
    build zh "$out/zh-rest/train.txt" --quantize int8 --ngram-order 8
    typed="$out/zh-split/test.txt"
    stage "zh: type the proverbs"
    "$py" -m training.evaluate "$out/zh.pt" --text "$typed" --learn --learn-rule all --fit-lines "$(tenth "$typed")" \
        --baseline ngram --train "$out/zh-rest/train.txt" --order "$order" "${more[@]}" --json "$out/zh-proverbs.json" \
        | tee "$out/zh-proverbs.txt"
    stage "zh: convert the proverbs from their pinyin"
    "$py" -m training.evaluate "$out/zh.pt" --text "$typed" --pinyin --learn --learn-rule online --fit-lines "$(tenth "$typed")" \
        --baseline ngram --train "$out/zh-rest/train.txt" --order "$order" "${more[@]}" --json "$out/zh-proverbs-pinyin.json" \
        | tee "$out/zh-proverbs-pinyin.txt"
    stage "zh: the same domain: held-out lines of the rest, with the weights fitted on the proverbs"
    "$py" -m training.evaluate "$out/zh.pt" --text "$out/zh-rest/test.txt" --learn --learn-rule all \
        --history-weights "$(fitted "$out/zh-proverbs.json")" --baseline ngram --train "$out/zh-rest/train.txt" \
        --order "$order" "${more[@]}" --json "$out/zh-rest.json" | tee "$out/zh-rest.txt"
fi
stage "done: $out/*.txt"
