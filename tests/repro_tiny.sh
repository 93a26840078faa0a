#!/usr/bin/env bash
# `victor repro` end to end on a tiny setting: every stage runs and the report is complete.
set -eu
VICTOR="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The output path holds shell syntax: the plots (gnuplot) must never pass it to a shell.
rd="$work/r'\$(touch PWNED)';touch PWNED2"
"$VICTOR" repro --preset tiny --out "$rd" --train-images 24 --test-images 4 --steps 12 --vision-steps 3 --vision-images 20 --pretrain-steps 4 --pool 2 \
  --registers 4,8 --summary-layers 1,2 --bench-repeats 2 --timing-rounds 2 --timing-steps 20 --bench-batch 4 --bench-gen 2,8 \
  --curriculum 2:identify:1:3x2@100,4:count+exist/50:1:3x3@0:75 --curriculum-images 16 --curriculum-summary-layers 2 > "$work/out.txt"
grep -qF "report: $rd/report.md" "$work/out.txt"
[ -z "$(find "$work" . -maxdepth 1 -name 'PWNED*')" ] || { echo "a path's shell syntax ran"; exit 1; }
r="$rd/report.md"
for pattern in "Stage 0, shared" "Stage C, shared" "| C1 | 2x2 | identify | 1 | 16 | 6 (2 x 3 of at most 2, bar 100.0%) |" "| C2 | 4x4, 75.0% empty | count, exist (50.0% empty) | 1 | 16 | 3 (1 x 3 of at most 3, bar 0.0%) |" "- C2 per family, after its last schedule: count " "| plain | \`none\` | 16 |" "| victor-m4-k1 | \`victor:m=4,k=1\` | 16 + 4 |" "| victor-m8-k1 | \`victor:m=8,k=1\` |" "| victor-m8-k2 | \`victor:m=8,k=2\` |" "victor-m8-k2 (k = 2):" "| pool-2x2 | \`pool:2\` | 4 |" \
               "| resampler-16 | \`resampler:latents=16\` | 16 |" "The reducers' own trained parameters: victor-m4-k1 256, " "| fastv-k2-keep0.25 | \`fastv:k=2,keep=0.25\` | 16 |" "| visionzip-4+0 | \`visionzip:dominant=4,contextual=0\` | 4 |" "paired 95%" "relative accuracy drop < 4% (a drop of at most" "Answer-prior baseline" \
               "relative accuracy drop < 4%" "training time at least 43% lower" "throughput at least 3.3x" \
               "b4_g2 req/s" "## Accuracy per question family" \
               "Training time measured again in 2 interleaved rounds" "every trained model for 12 stage-2 steps"; do
  grep -qF -- "$pattern" "$r" || { echo "report lacks: $pattern"; cat "$r"; exit 1; }
done
for f in bench.json summary.json answers-plain.jsonl answers-victor-m8-k2.jsonl models/victor-m8-k2/model.safetensors \
         models/victor-m8-k1/trainer_state.json gridvqa/test.jsonl curriculum-1/train.json curriculum-1/metrics-2.jsonl curriculum-2/meta.json; do
  [ -s "$rd/$f" ] || { echo "missing $f"; exit 1; }
done
# The verdicts carry ranges: the time reduction over the full run and 2 rounds, the throughput over 2 repeats;
# each trained model has a step time per round, the training-free ones none.
grep -qE -- "- training time at least 43% lower: measured -?[0-9.]+% \[-?[0-9.]+%, -?[0-9.]+%\] — (met|missed|not resolved)" "$r" || { echo "time verdict has no range"; exit 1; }
grep -qE -- "- throughput at least 3.3x \(b4_g2\): measured [0-9.]+x \[[0-9.]+x, [0-9.]+x\] — (met|missed|not resolved)" "$r" || { echo "throughput verdict has no range"; exit 1; }
grep -qE "^\| victor-m8-k2 \| [0-9.]+ s, -?[0-9.]+% \| [0-9.]+ s \(-?[0-9.]+%\), [0-9.]+ s \(-?[0-9.]+%\) \|$" "$r" || { echo "timing row of victor-m8-k2 missing"; exit 1; }
# The accuracy bound is 4% of the plain model's accuracy, in points: at most 4.00.
bound=$(grep -oE "a drop of at most [0-9.]+ points" "$r" | head -1 | grep -oE "[0-9.]+")
awk -v b="$bound" 'BEGIN { exit !(b != "" && b <= 4.0) }' || { echo "accuracy bound $bound points is not 4% of an accuracy"; exit 1; }
sj=$(tr -d ' \n' < "$rd/summary.json")
for pattern in '"timing_step_seconds":\[[0-9.e-]+,[0-9.e-]+\]' '"time_reduction_rounds":\[-?[0-9.e-]+,-?[0-9.e-]+\]' \
               '"throughput_ratio_repeats":\[[0-9.e-]+,[0-9.e-]+\]' '"timing_step_seconds":\[\],"train_seconds":0(\.0)?,"training_free":true'; do
  echo "$sj" | grep -qE -- "$pattern" || { echo "summary.json lacks $pattern"; exit 1; }
done
# Stage 0 trains on its own set, the size asked for, and the report says so.
grep -q '"train_images": *20' "$rd/gridvqa-vision/meta.json" || { echo "stage 0's set is not 20 images"; cat "$rd/gridvqa-vision/meta.json"; exit 1; }
grep -qF "3 steps of 32 images from 20 of its own" "$r" || { echo "report does not name stage 0's set"; exit 1; }
# Stage C with the drop after layer 2 says so, and hands on a plain model (no drop in its config).
grep -qF "the visual tokens dropped after layer 2 (no registers)" "$r" || { echo "report does not name stage C's drop"; exit 1; }
if grep -q '"summary_layers"' "$rd/models/init/config.json"; then echo "stage C saved its drop into the shared start"; exit 1; fi
if grep -q '"summary_layers"' "$rd/models/plain/config.json"; then echo "plain model has a drop"; exit 1; fi
# The stage's EMPTY field reaches its GridVQA.
grep -q '"empty_rate": *0.75' "$rd/curriculum-2/meta.json" || { echo "C2 was not built with 75% empty cells"; cat "$rd/curriculum-2/meta.json"; exit 1; }
# A family's own EMPTY gets its own set, trained with the stage's (count at 75%, exist at 50%).
fams() { tr -d ' \n' < "$1" | grep -o '"families":\[[^]]*\]'; }
[ "$(fams "$rd/curriculum-2/meta.json")" = '"families":["count"]' ] || { echo "C2's first set is not count only"; exit 1; }
[ "$(fams "$rd/curriculum-2-empty50/meta.json")" = '"families":["exist"]' ] || { echo "C2's exist set is missing"; exit 1; }
grep -q '"empty_rate": *0.5' "$rd/curriculum-2-empty50/meta.json" || { echo "C2's exist set is not 50% empty"; exit 1; }
grep -qE -- '- C2 per family, after its last schedule: count [0-9.]+% \(prior [0-9.]+%\), exist [0-9.]+% \(prior' "$r" || { echo "C2 does not report both sets' families"; exit 1; }
# Grounded attention (on by default, layer 1): stage C and the stage 2 of every model whose visual tokens
# reach layer 1 are grounded, the k = 1 twins are not, and the report and the logs say so.
grep -qF "Grounded attention (weight 1, decoder layer 1, 1 head)" "$r" || { echo "report does not describe grounding"; exit 1; }
grep -qF "not in stage 2 of victor-m4-k1, victor-m8-k1, resampler-16 (their visual tokens leave before that layer, or are not on the patch grid)" "$r" || { echo "report does not name the ungrounded twins"; exit 1; }
for m in plain victor-m8-k2 pool-2x2; do grep -q '"ground_mass"' "$rd/models/$m/metrics.jsonl" || { echo "$m was not grounded"; exit 1; }; done
if grep -q '"ground_mass"' "$rd/models/victor-m8-k1/metrics.jsonl"; then echo "victor-m8-k1 was grounded after its drop"; exit 1; fi
grep -q '"ground_mass"' "$rd/curriculum-1/metrics.jsonl" || { echo "stage C was not grounded"; exit 1; }
grep -q '"boxes"' "$rd/gridvqa/train.json" || { echo "GridVQA wrote no boxes"; exit 1; }
if command -v gnuplot >/dev/null; then
  [ -s "$rd/accuracy_vs_registers.png" ] && [ -s "$rd/throughput_vs_registers.png" ] && [ -s "$rd/accuracy_vs_throughput.png" ] || { echo "plots missing"; exit 1; }
fi
# The trained Victor checkpoint generates.
"$VICTOR" generate --model "$rd/models/victor-m8-k2" --image "$rd/gridvqa/images/test_000000.png" \
  --prompt "How many bags are there?" --max-new-tokens 4 --stats 2>&1 | grep -q "reducer victor m=8 k=2: layers 0-1 see"
# Stage C's drop with a pooled stage is refused up front (a model has one reducer).
if "$VICTOR" repro --preset tiny --out "$work/bad3" --curriculum 2:identify:2:3 --curriculum-summary-layers 2 > "$work/bad3.txt" 2>&1; then
  echo "repro accepted a pooled stage C with --curriculum-summary-layers"; exit 1
fi
grep -q "one token reducer" "$work/bad3.txt" || { echo "pooled stage C error unclear:"; cat "$work/bad3.txt"; exit 1; }
[ ! -e "$work/bad3" ] || { echo "repro wrote $work/bad3 before refusing"; exit 1; }
# A k the preset does not have is refused before any work is done.
if "$VICTOR" repro --preset tiny --out "$work/bad" --summary-layers 1,4 > "$work/bad.txt" 2>&1; then
  echo "repro accepted k = 4 on a 4-layer preset"; exit 1
fi
grep -q "summary-layers 4" "$work/bad.txt" || { echo "k error unclear:"; cat "$work/bad.txt"; exit 1; }
[ ! -e "$work/bad" ] || { echo "repro wrote $work/bad before refusing k"; exit 1; }
if "$VICTOR" repro --preset tiny --out "$work/bad2" --curriculum-summary-layers 4 > "$work/bad2.txt" 2>&1; then
  echo "repro accepted --curriculum-summary-layers 4 on a 4-layer preset"; exit 1
fi
grep -q "curriculum-summary-layers 4" "$work/bad2.txt" || { echo "stage C k error unclear:"; cat "$work/bad2.txt"; exit 1; }
[ ! -e "$work/bad2" ] || { echo "repro wrote $work/bad2 before refusing"; exit 1; }
if "$VICTOR" repro --preset tiny --out "$work/bad3" --curriculum-summary-layers 2 --ground-layer 2 > "$work/bad3.txt" 2>&1; then
  echo "repro accepted grounding layer 2 with stage C's drop after layer 2"; exit 1
fi
grep -q "ground-layer 2" "$work/bad3.txt" || { echo "grounding layer error unclear:"; cat "$work/bad3.txt"; exit 1; }
[ ! -e "$work/bad3" ] || { echo "repro wrote $work/bad3 before refusing"; exit 1; }
# scripts/gridvqa_hr.sh on this run's models (carried to llava-next-tiny, GridVQA-HR at 14-pixel cells): a
# table row per configuration with its interval and, past plain, the paired difference; OUT is never reused.
hr="$work/hr"
PRESET=llava-next-tiny STEPS=2 TRAIN_IMAGES=4 TEST_IMAGES=2 CELL=14 ITEMS=4-10 BASE_ROWS=17 MODELS="plain victor-m8-k2 pool-2x2" \
  FASTV=fastv:k=2,keep=0.25 VISIONZIP=visionzip:dominant=4,contextual=2 \
  bash "$(dirname "$0")/../scripts/gridvqa_hr.sh" "$rd" "$hr" "$VICTOR" > "$work/hr.txt" 2> "$work/hr.err" \
  || { echo "gridvqa_hr.sh failed:"; tail -5 "$work/hr.err"; exit 1; }
[ "$(grep -cE '^\| [^|]+ \| [0-9.]+% \[[0-9.]+, [0-9.]+\] \| ' "$hr/results.md")" -eq 6 ] || { echo "gridvqa_hr.sh table:"; cat "$hr/results.md"; exit 1; }
[ "$(grep -cE '\| [-+][0-9.]+ \[[-+][0-9.]+, [-+][0-9.]+\] \|' "$hr/results.md")" -eq 5 ] || { echo "gridvqa_hr.sh: paired differences missing"; exit 1; }
grep -q '"layout": "scattered"' "$hr/data/meta.json" || { echo "gridvqa_hr.sh: data not scattered"; exit 1; }
grep -q '"LlavaNextForConditionalGeneration"' "$hr/models/victor-m8-k2/config.json" || { echo "gridvqa_hr.sh: model not NeXT"; exit 1; }
for m in plain victor-m8-k2 pool-2x2; do grep -q '"ground_mass"' "$hr/models/$m/metrics.jsonl" || { echo "gridvqa_hr.sh: $m not grounded"; exit 1; }; done
if bash "$(dirname "$0")/../scripts/gridvqa_hr.sh" "$rd" "$hr" "$VICTOR" 2> "$work/hr2.err"; then echo "gridvqa_hr.sh reused $hr"; exit 1; fi
grep -q "exists" "$work/hr2.err" || { echo "gridvqa_hr.sh: reuse refused unclearly"; cat "$work/hr2.err"; exit 1; }
echo "repro tiny: ok"
