#!/usr/bin/env bash
# GridVQA-HR: does each token reducer keep the detail of LLaVA-NeXT's crops? (issue 40)
#
#   scripts/gridvqa_hr.sh REPRO_DIR OUT [VICTOR]
#
# Takes the trained models of a `victor repro` run (REPRO_DIR/models/plain, victor-m*, pool-*),
# carries each to LLaVA-NeXT's AnyRes as LLaVA-NeXT starts from LLaVA-1.5 (`victor init --from`:
# the same weights, a new image_newline), fine-tunes each with the same budget on GridVQA-HR
# (`victor data gridvqa --scattered`: items of random sizes off the patch grid, some across crop
# boundaries, on non-square canvases), and evaluates every model and the training-free reducers
# (FastV, VisionZip, the base view alone) on the same test questions, each paired against the plain
# model. Writes OUT/results.md (the table) and every answers file; never touches REPRO_DIR.
#
# Settings (environment): PRESET (small-next; llava-next-tiny for a tiny repro), STEPS (200),
# TRAIN_IMAGES (2000), TEST_IMAGES (250: 1,000 questions), CANVASES (4x4,2x4,4x2), CELL (56),
# ITEMS (14-40), LR (3e-4), SEED (40), BASE_ROWS (257: the base view and its newline on small-next;
# 17 on llava-next-tiny), FASTV (fastv:k=2,keep=0.0625), VISIONZIP (visionzip:dominant=13,contextual=3),
# MODELS (plain victor-m8 pool-4x4: the repro models carried over, plain first), GROUND (1: grounded
# attention with this weight on decoder layer 1, one head, as the repro's default, for every model;
# 0: none).
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,20p "$0"; exit 2; }
repro="$1"
out="$2"
victor="${3:-$(dirname "$0")/../build/victor}"
PRESET="${PRESET:-small-next}" STEPS="${STEPS:-200}" TRAIN_IMAGES="${TRAIN_IMAGES:-2000}" TEST_IMAGES="${TEST_IMAGES:-250}"
CANVASES="${CANVASES:-4x4,2x4,4x2}" CELL="${CELL:-56}" ITEMS="${ITEMS:-14-40}" LR="${LR:-3e-4}" SEED="${SEED:-40}"
BASE_ROWS="${BASE_ROWS:-257}" FASTV="${FASTV:-fastv:k=2,keep=0.0625}" VISIONZIP="${VISIONZIP:-visionzip:dominant=13,contextual=3}"
MODELS="${MODELS:-plain victor-m8 pool-4x4}" GROUND="${GROUND:-1}"
[ -x "$victor" ] || { echo "gridvqa_hr.sh: $victor is not an executable victor" >&2; exit 2; }
[ -d "$repro/models" ] || { echo "gridvqa_hr.sh: $repro/models not found (the output folder of victor repro)" >&2; exit 2; }
[ ! -e "$out" ] || { echo "gridvqa_hr.sh: $out exists; choose a new folder (nothing is overwritten)" >&2; exit 2; }
set -- $MODELS
[ "$1" = plain ] || { echo "gridvqa_hr.sh: MODELS must start with plain (the reference)" >&2; exit 2; }
for m in $MODELS; do
  [ -f "$repro/models/$m/config.json" ] || { echo "gridvqa_hr.sh: $repro/models/$m is not a model" >&2; exit 2; }
done

mkdir -p "$out/models" "$out/logs"
say() { echo "gridvqa_hr: $*" >&2; }
say "building GridVQA-HR ($TRAIN_IMAGES train / $TEST_IMAGES test images, canvases $CANVASES) in $out/data"
"$victor" data gridvqa --scattered --canvases "$CANVASES" --cell-pixels "$CELL" --item-pixels "$ITEMS" \
  --out "$out/data" --train-images "$TRAIN_IMAGES" --test-images "$TEST_IMAGES" --text-grids 0 --seed "$SEED" >&2

for m in $MODELS; do
  ground=()
  [ "$GROUND" = 0 ] || ground=(--ground-weight "$GROUND" --ground-layer 1 --ground-heads 1)
  say "$m: carried to $PRESET, then $STEPS steps on GridVQA-HR${ground:+ (grounded)}"
  "$victor" init --preset "$PRESET" --from "$repro/models/$m" --out "$out/models/$m-start" >&2
  start=$(date +%s)
  "$victor" train --model "$out/models/$m-start" --data "$out/data/train.json" --out "$out/models/$m" --train finetune \
    --lr "$LR" --batch-size 8 --max-steps "$STEPS" --autocast-bf16 --seed 0 "${ground[@]}" > "$out/logs/train-$m.log" 2>&1 \
    || { tail -5 "$out/logs/train-$m.log" >&2; exit 1; }
  echo $(( $(date +%s) - start )) > "$out/logs/train-$m.seconds"
done

# name | model | extra eval options
runs=()
for m in $MODELS; do runs+=("$m|$m|"); done
runs+=("base view only (plain)|plain|--max-image-tokens $BASE_ROWS" "$FASTV (plain)|plain|--reducer $FASTV"
       "$VISIONZIP (plain)|plain|--reducer $VISIONZIP")
{
  echo "| configuration | accuracy [95% interval] | minus plain, paired [95% interval] | identify | count | exist | locate |"
  echo "|---|---|---|---|---|---|---|"
} > "$out/results.md"
i=0
for r in "${runs[@]}"; do
  IFS='|' read -r name model extra <<< "$r"
  say "evaluating $name"
  log="$out/logs/eval-$i.log"
  cmp=()
  [ $i -eq 0 ] || cmp=(--compare-answers "$out/answers-0.jsonl")
  # shellcheck disable=SC2086  # $extra is one of the fixed option pairs above
  "$victor" eval --model "$out/models/$model" --questions "$out/data/test.jsonl" --answers-out "$out/answers-$i.jsonl" \
    "${cmp[@]}" $extra > "$log" 2>&1 || { tail -5 "$log" >&2; exit 1; }
  acc=$(sed -n 's/^accuracy \([0-9.]*%\) ([0-9/]*), 95% interval \(\[[0-9., ]*\]\).*/\1 \2/p' "$log")
  diff=$(sed -n 's/^this run minus .*: \([-+0-9.]*\) points, 95% paired interval \(\[[-+0-9., ]*\]\).*/\1 \2/p' "$log")
  fam() { sed -n "s/^  $1 *\([0-9.]*%\).*/\1/p" "$log"; }
  echo "| $name | $acc | ${diff:-—} | $(fam identify) | $(fam count) | $(fam exist) | $(fam locate) |" >> "$out/results.md"
  i=$((i + 1))
done
say "results in $out/results.md"
cat "$out/results.md"
