#!/usr/bin/env bash
# Small ablation run used for EXPERIMENTS.md: copies the data, BM25 (plain and expanded) and base-model stages of
# artifacts/ into $EXP_DIR/NAME, reruns the synthetic + dense (+ fusion) stages with config overrides, evaluates the
# held-out train queries (the selection set; fitted fusion modes are in-sample there), dev and DL19.
# usage: scripts/ablation_run.sh NAME MODES OVERRIDE...   e.g. scripts/ablation_run.sh static dense 'dense.encoder.kind="static"'
set -euo pipefail
usage="usage: scripts/ablation_run.sh NAME MODES OVERRIDE...  (e.g. scripts/ablation_run.sh static dense 'dense.encoder.kind=\"static\"')"
case ${1:-} in -h|--help) echo "$usage"; exit 0;; esac
if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
cd "$(dirname "$0")/.."; . .venv/bin/activate
export MSMARCO_DIR=${MSMARCO_DIR:?set MSMARCO_DIR}
name=$1; modes=$2; shift 2
A=${EXP_DIR:-/tmp/exps}/$name; mkdir -p $A
for d in passages bm25 bm25_expanded base_models; do [ -e $A/$d ] || cp -r artifacts/$d $A/; done
sets=(); for o in "$@"; do sets+=(--set "$o"); done
stages="synthetic dense_train dense_index"
case $modes in *rrf*|*convex*|*hybrid*) stages="$stages fusion";; esac
start=$(date +%s)
python scripts/run_pipeline.py --config configs/cpu-marco43k.toml --artifacts $A --stages data bm25 $stages "${sets[@]}" > $A/pipeline.log 2>&1
echo "$name pipeline seconds: $(( $(date +%s) - start ))" | tee $A/seconds.txt
# the held-out train queries first: choices are made on them; dev and DL19 are reported
python scripts/export_holdout.py --config configs/cpu-marco43k.toml --out $A/holdout > /dev/null
for s in holdout dev dl19; do rl=1; [ $s = dl19 ] && rl=2
  q=$MSMARCO_DIR/queries.$s.tsv; r=$MSMARCO_DIR/qrels.$s.txt
  [ $s = holdout ] && q=$A/holdout/queries.tsv && r=$A/holdout/qrels.txt
  python scripts/evaluate.py --queries $q --qrels $r --rel-level $rl \
     --modes $modes --artifacts $A --name $s --out $A/eval --latency-queries 50 > $A/eval.$s.log 2>&1
  echo "## $name $s"; grep "^|" $A/eval.$s.log
done
