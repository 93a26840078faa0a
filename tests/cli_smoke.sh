#!/usr/bin/env bash
# End-to-end CLI checks: the happy path, and bad input that must fail with one clear line.
set -u
VICTOR="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0

expect_error() {  # expect_error "what" "pattern" cmd...
  local what="$1" pattern="$2"
  shift 2
  local out rc
  out=$("$@" 2>&1 >/dev/null)
  rc=$?
  if [ $rc -eq 0 ]; then echo "FAIL ($what): exit 0"; fail=1; return; fi
  if [ $rc -ge 128 ]; then echo "FAIL ($what): crashed (exit $rc)"; fail=1; return; fi
  if echo "$out" | grep -qiE 'terminate called|Exception raised from|frame #'; then
    echo "FAIL ($what): stack trace: $out"; fail=1; return; fi
  if [ "$(echo "$out" | grep -c .)" -gt 3 ]; then echo "FAIL ($what): not a short reason: $out"; fail=1; return; fi
  if ! echo "$out" | grep -qiE "$pattern"; then echo "FAIL ($what): '$out' lacks '$pattern'"; fail=1; return; fi
  echo "ok ($what): $out"
}

"$VICTOR" init --preset tiny --out "$work/m" >/dev/null || { echo "FAIL: init"; exit 1; }
"$VICTOR" init --preset tiny --registers 8 --summary-layers 2 --out "$work/v" >/dev/null || { echo "FAIL: init victor"; exit 1; }
"$VICTOR" data gridvqa --out "$work/g" --train-images 2 --test-images 1 >/dev/null || { echo "FAIL: gridvqa"; exit 1; }
img="$work/g/images/test_000000.png"

out=$("$VICTOR" generate --model "$work/m" --image "$img" --prompt "What is in row 1, column 1?" --max-new-tokens 4 --stats --dump-logits "$work/l.npy" 2>&1)
echo "$out" | grep -q "time to first token" || { echo "FAIL: --stats missing: $out"; fail=1; }
[ -s "$work/l.npy" ] || { echo "FAIL: --dump-logits wrote nothing"; fail=1; }
out=$("$VICTOR" generate --model "$work/v" --image "$img" --prompt "How many bags are there?" --max-new-tokens 4 --stats 2>&1)
echo "$out" | grep -q "reducer victor m=8 k=2: layers 0-1 see" || { echo "FAIL: victor stats: $out"; fail=1; }
echo "$out" | grep -q "8 registers" || { echo "FAIL: registers not shown: $out"; fail=1; }
# Victor on a plain checkpoint, registers from the mean of calibration images.
"$VICTOR" generate --model "$work/m" --image "$img" --prompt "Is there a bag?" --registers 4 --summary-layers 1 \
  --register-init mean --calibration-images "$img" --max-new-tokens 2 >/dev/null 2>&1 || { echo "FAIL: mean init"; fail=1; }

# Training-free reducers on the plain checkpoint, and every reducer in one bench table.
for r in fastv:k=2,keep=0.25 visionzip:dominant=4,contextual=2 pool:2 victor:m=4,k=1; do
  out=$("$VICTOR" generate --model "$work/m" --image "$img" --prompt "How many bags are there?" --max-new-tokens 3 --stats --reducer "$r" 2>&1) \
    || { echo "FAIL: generate --reducer $r: $out"; fail=1; }
done
echo "$out" | grep -q "reducer victor m=4 k=1" || { echo "FAIL: --reducer not applied: $out"; fail=1; }
out=$("$VICTOR" bench --model "$work/m" --reducer victor:m=4,k=1 --reducer fastv:k=2,keep=0.25 --reducer visionzip:dominant=4,contextual=2 \
  --reducer pool:2 --batch 1 --gen 2 --repeats 1 2>/dev/null) || { echo "FAIL: bench --reducer"; fail=1; }
for name in plain "victor m=4 k=1" "fastv k=2 keep=0.25" "visionzip 4+2" "pool 2x2"; do
  echo "$out" | grep -q "^$name " || { echo "FAIL: bench table lacks '$name': $out"; fail=1; }
done
expect_error "unknown reducer" "'zip:3'.*unknown reducer" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --reducer zip:3
expect_error "fastv keep" "'fastv:k=2,keep=1.5'.*keep" "$VICTOR" bench --model "$work/m" --reducer fastv:k=2,keep=1.5
expect_error "fastv past the last layer" "'fastv:k=9,keep=0.5'.*between 1 and 3" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --reducer fastv:k=9,keep=0.5
expect_error "reducer and shorthand" "one or the other" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --reducer pool:2 --registers 4
expect_error "training-free reducer in training" "training-free" "$VICTOR" train --model "$work/m" --data "$work/g/train.json" --out "$work/t" --reducer fastv:k=2,keep=0.5 --max-steps 1
expect_error "other register count" "8 trained registers" "$VICTOR" train --model "$work/v" --data "$work/g/train.json" --out "$work/t" --registers 4 --max-steps 1

# LLaVA-NeXT: a tiny AnyRes model answers about an 84-pixel GridVQA image (2 x 2 crops) with each NeXT reducer; the cap
# cuts the visual rows (--stats shows them); bench and eval run on it; refusals name the cause.
"$VICTOR" init --preset llava-next-tiny --out "$work/n" >/dev/null || { echo "FAIL: init llava-next-tiny"; exit 1; }
"$VICTOR" data gridvqa --out "$work/g3" --grid 3 --train-images 1 --test-images 1 >/dev/null || { echo "FAIL: gridvqa 3"; exit 1; }
wide="$work/g3/images/test_000000.png"
full=$("$VICTOR" generate --model "$work/n" --image "$wide" --prompt "How many bags are there?" --max-new-tokens 3 --stats 2>&1) \
  || { echo "FAIL: generate on llava-next-tiny: $full"; fail=1; }
capped=$("$VICTOR" generate --model "$work/n" --image "$wide" --prompt "How many bags are there?" --max-new-tokens 3 --stats --max-crops 1 2>&1) \
  || { echo "FAIL: generate --max-crops 1: $capped"; fail=1; }
v_full=$(echo "$full" | sed -n 's/.*prompt text, \([0-9]*\) visual.*/\1/p')
v_cap=$(echo "$capped" | sed -n 's/.*prompt text, \([0-9]*\) visual.*/\1/p')
if [ -z "$v_full" ] || [ -z "$v_cap" ] || [ "$v_cap" -ge "$v_full" ]; then
  echo "FAIL: --max-crops did not cut the visual rows ($v_full -> $v_cap)"; fail=1; else echo "ok (NeXT cap): $v_full -> $v_cap visual rows"; fi
for r in victor:m=4,k=1 fastv:k=2,keep=0.5 pool:2 visionzip:dominant=4,contextual=2; do
  "$VICTOR" generate --model "$work/n" --image "$wide" --prompt "Is there a bag?" --max-new-tokens 2 --reducer "$r" >/dev/null 2>&1 \
    || { echo "FAIL: NeXT generate --reducer $r"; fail=1; }
done
out=$("$VICTOR" bench --model "$work/n" --reducer victor:m=4,k=1 --batch 1 --gen 2 --repeats 1 --image-size 50x30 2>/dev/null) \
  || { echo "FAIL: NeXT bench"; fail=1; }
echo "$out" | grep -q "^victor m=4 k=1 " || { echo "FAIL: NeXT bench table: $out"; fail=1; }
"$VICTOR" eval --model "$work/n" --questions "$work/g3/test.jsonl" --limit 2 --max-new-tokens 2 >/dev/null 2>&1 || { echo "FAIL: NeXT eval"; fail=1; }
"$VICTOR" train --model "$work/n" --data "$work/g3/train.json" --out "$work/nt" --max-steps 2 --batch-size 1 --registers 2 --summary-layers 1 >/dev/null 2>&1 \
  || { echo "FAIL: NeXT train"; fail=1; }
# Grounded attention on NeXT: GridVQA's boxes onto the packed rows (plain, Victor, pooling).
"$VICTOR" train --model "$work/n" --data "$work/g3/train.json" --out "$work/ng" --max-steps 2 --batch-size 1 --ground-weight 1 \
  --ground-layer 0 --registers 2 --summary-layers 1 >/dev/null 2>&1 || { echo "FAIL: NeXT train --ground-weight"; fail=1; }
grep -q '"ground_mass"' "$work/ng/metrics.jsonl" 2>/dev/null || { echo "FAIL: NeXT grounding reported no ground_mass"; fail=1; }
"$VICTOR" train --model "$work/n" --data "$work/g3/train.json" --out "$work/ngp" --max-steps 2 --batch-size 1 --ground-weight 1 \
  --ground-layer 0 --visual-pool 2 >/dev/null 2>&1 || { echo "FAIL: NeXT train --ground-weight --visual-pool"; fail=1; }
grep -q '"ground_mass"' "$work/ngp/metrics.jsonl" 2>/dev/null || { echo "FAIL: pooled NeXT grounding reported no ground_mass"; fail=1; }
"$VICTOR" generate --model "$work/nt" --image "$wide" --prompt "Is there a bag?" --max-new-tokens 2 >/dev/null 2>&1 || { echo "FAIL: trained NeXT model"; fail=1; }
"$VICTOR" quantize --model "$work/n" --out "$work/nq" --dtype int8 >/dev/null 2>&1 || { echo "FAIL: NeXT quantize"; fail=1; }
"$VICTOR" generate --model "$work/nq" --image "$wide" --prompt "Is there a bag?" --max-new-tokens 2 >/dev/null 2>&1 || { echo "FAIL: quantized NeXT model"; fail=1; }
# init --from: a LLaVA-1.5 checkpoint becomes a NeXT one (LLaVA-NeXT's start): every source tensor
# copied bit for bit, image_newline new, the tokenizer the source's; mismatches refused by name.
"$VICTOR" init --preset llava-next-tiny --from "$work/v" --out "$work/nf" >/dev/null || { echo "FAIL: init --from"; fail=1; }
python3 - "$work/v/model.safetensors" "$work/nf/model.safetensors" <<'PY' || { echo "FAIL: init --from did not copy the weights"; fail=1; }
import json, struct, sys
def read(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]) for k, v in h.items()}
src, dst = read(sys.argv[1]), read(sys.argv[2])
bad = [k for k in src if src[k] != dst.get(k)]
extra = sorted(set(dst) - set(src))
if bad or not any("image_newline" in k for k in extra) or len(extra) != 1:
    sys.exit("differ: %s, new: %s" % (bad[:3], extra))
PY
cmp -s "$work/v/tokenizer.model" "$work/nf/tokenizer.model" || { echo "FAIL: init --from: tokenizer not the source's"; fail=1; }
grep -q '"LlavaNextForConditionalGeneration"' "$work/nf/config.json" || { echo "FAIL: init --from: not a NeXT config"; fail=1; }
"$VICTOR" generate --model "$work/nf" --image "$wide" --prompt "Is there a bag?" --max-new-tokens 2 >/dev/null 2>&1 || { echo "FAIL: generate on init --from"; fail=1; }
expect_error "init --from other shapes" "vision_config.hidden_size is 32, preset small has 192" "$VICTOR" init --preset small --from "$work/v" --out "$work/x"
expect_error "init --from drops registers" "victor.registers has no place.*--reducer" "$VICTOR" init --preset llava-next-tiny --from "$work/v" --reducer none --out "$work/x"
expect_error "init --from with a corpus" "own tokenizer" "$VICTOR" init --preset llava-next-tiny --from "$work/v" --vocab-size 400 --out "$work/x"
[ ! -e "$work/x" ] || { echo "FAIL: a refused init --from left $work/x"; fail=1; }
expect_error "NeXT resampler" "not implemented on LLaVA-NeXT" "$VICTOR" generate --model "$work/n" --image "$wide" --prompt "hi" --reducer resampler:latents=4
expect_error "cap below a base view" "max-image-tokens 5 is below" "$VICTOR" generate --model "$work/n" --image "$wide" --prompt "hi" --max-image-tokens 5
expect_error "cap on LLaVA-1.5" "LLaVA-1.5" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --max-crops 1

echo "not an image" > "$work/bad.png"
expect_error "missing model" "not found" "$VICTOR" generate --model "$work/nope" --image "$img" --prompt "hi"
expect_error "not an image" "bad.png.*not a readable image" "$VICTOR" generate --model "$work/m" --image "$work/bad.png" --prompt "hi"
expect_error "empty prompt" "empty prompt" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "  "
expect_error "top-p range" "top-p" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --top-p 1.5
expect_error "temperature nan" "temperature.*not a finite number" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --temperature nan
expect_error "top-p nan" "top-p.*not a finite number" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --top-p nan
expect_error "max tokens range" "max-new-tokens" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --max-new-tokens 0
expect_error "summary layers" "summary_layers" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --summary-layers 99
expect_error "too many images" "2 images" "$VICTOR" generate --model "$work/m" --image "$img" --image "$img" --prompt "<image> hi"
expect_error "unknown preset" "preset" "$VICTOR" init --preset huge --out "$work/x"
expect_error "bad curriculum stage" "2:identify:8.*GRID:FAMILIES:POOL:STEPS" "$VICTOR" repro --out "$work/rc" --curriculum 2:identify:8
expect_error "curriculum pool" "POOL 3 does not divide" "$VICTOR" repro --preset tiny --out "$work/rc" --curriculum 2:all:3:10
[ ! -e "$work/rc" ] || { echo "FAIL: a refused repro left $work/rc"; fail=1; }
cp -r "$work/m" "$work/trunc"
head -c 2000 "$work/m/model.safetensors" > "$work/trunc/model.safetensors"
expect_error "truncated checkpoint" "model.safetensors" "$VICTOR" generate --model "$work/trunc" --image "$img" --prompt "hi"
# victor serve refuses what it cannot serve before listening.
expect_error "serve: no model" "nope.*config.json|config.json.*nope|not found" "$VICTOR" serve --model "$work/nope" --port 0
expect_error "serve: bad --allow-files" "allow-files" "$VICTOR" serve --model "$work/m" --port 0 --allow-files "$work/nowhere"
expect_error "serve: bad reducer" "fastv" "$VICTOR" serve --model "$work/m" --port 0 --reducer fastv:k=99
expect_error "serve: bad kv dtype" "kv-dtype" "$VICTOR" serve --model "$work/m" --port 0 --kv-dtype f8
expect_error "bench-serve: no model" "config.json" "$VICTOR" bench-serve --model "$work/nope"

# int4 weights and per-part storage: quantize, then generate and eval load the folders as written.
"$VICTOR" quantize --model "$work/m" --out "$work/q4" --dtype int4 >/dev/null 2>&1 || { echo "FAIL: int4 quantize"; fail=1; }
grep -q '"victor_int4"' "$work/q4/config.json" || { echo "FAIL: int4 config.json"; fail=1; }
out=$("$VICTOR" generate --model "$work/q4" --image "$img" --prompt "Is there a bag?" --max-new-tokens 2 --stats 2>&1)
echo "$out" | grep -q "weights: int4" || { echo "FAIL: int4 generate: $out"; fail=1; }
# scripts/int4_format_drift.py's q4_0 is victor's int4 rounding: its float32 folder gives the
# logits of the int4 folder widened to float32, bit for bit.
py=/usr/bin/python3  # Debian's, where setup.sh installs NumPy
if "$py" -c "import numpy" 2>/dev/null; then
  "$py" "$(dirname "$0")/../scripts/int4_format_drift.py" "$work/m" "$work/q4" "$work/f4" q4_0 >/dev/null \
    || { echo "FAIL: int4_format_drift.py q4_0"; fail=1; }
  "$VICTOR" generate --model "$work/q4" --dtype f32 --image "$img" --prompt "Is there a bag?" --max-new-tokens 2 \
    --dump-logits "$work/l4.npy" >/dev/null 2>&1 || { echo "FAIL: int4 folder as f32"; fail=1; }
  "$VICTOR" generate --model "$work/f4" --image "$img" --prompt "Is there a bag?" --max-new-tokens 2 \
    --dump-logits "$work/lf4.npy" >/dev/null 2>&1 || { echo "FAIL: q4_0-rounded folder"; fail=1; }
  cmp -s "$work/l4.npy" "$work/lf4.npy" || { echo "FAIL: int4_format_drift.py q4_0 differs from victor's int4"; fail=1; }
  "$py" "$(dirname "$0")/../scripts/int4_format_drift.py" "$work/m" "$work/q4" "$work/f4" q4_1 >/dev/null 2>&1 \
    && { echo "FAIL: int4_format_drift.py wrote over an existing folder"; fail=1; }
  "$py" "$(dirname "$0")/../scripts/int4_format_drift.py" "$work/m" "$work/q4" "$work/f41" q4_1 >/dev/null \
    || { echo "FAIL: int4_format_drift.py q4_1"; fail=1; }
  "$VICTOR" generate --model "$work/f41" --image "$img" --prompt "Is there a bag?" --max-new-tokens 2 \
    --dump-logits "$work/lf41.npy" >/dev/null 2>&1 || { echo "FAIL: q4_1-rounded folder"; fail=1; }
  cmp -s "$work/l4.npy" "$work/lf41.npy" && { echo "FAIL: q4_1 rounded as q4_0"; fail=1; }
else
  echo "SKIP: python3 with NumPy not installed (int4_format_drift.py not checked)"
fi
"$VICTOR" quantize --model "$work/m" --out "$work/qp" --dtype llm=int4,vision=bf16,projector=bf16 >/dev/null 2>&1 \
  || { echo "FAIL: per-part quantize"; fail=1; }
out=$("$VICTOR" generate --model "$work/qp" --image "$img" --prompt "Is there a bag?" --max-new-tokens 2 --stats 2>&1)
echo "$out" | grep -q "weights: llm=int4,vision=bf16,projector=bf16" || { echo "FAIL: per-part generate: $out"; fail=1; }
out=$("$VICTOR" generate --model "$work/m" --dtype vision=int8 --image "$img" --prompt "Is there a bag?" --max-new-tokens 2 --stats 2>&1)
echo "$out" | grep -q "weights: llm=f32,vision=int8,projector=f32" || { echo "FAIL: per-part load: $out"; fail=1; }
expect_error "dtype: unknown part" "unknown part 'gpu'" "$VICTOR" generate --model "$work/m" --image "$img" --prompt "hi" --dtype gpu=int4
expect_error "dtype: unknown storage" "int3" "$VICTOR" quantize --model "$work/m" --out "$work/q3" --dtype llm=int3
expect_error "dtype: part twice" "twice" "$VICTOR" bench --preset tiny --dtype llm=int4,llm=int8
exit $fail
