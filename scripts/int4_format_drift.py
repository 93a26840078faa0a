#!/usr/bin/env python3
"""Rounds a float32 victor folder's int4 matrices as another 4-bit format would, for measuring a
format's accuracy before building it (docs/benchmarks.md, "4-bit formats"). The result is a float32
folder whose matrices hold the format's dequantized values, so `victor eval` on it measures the
weights' rounding alone (victor's int4 also rounds the activations to 8 bits; compare with
`--format q4_0`, victor's own rounding, to see that share).

  python3 scripts/int4_format_drift.py F32_DIR INT4_DIR OUT_DIR q4_0|q4_1

F32_DIR: a float32 model folder (one model.safetensors). INT4_DIR: the same model written by
`victor quantize --dtype ...int4...`: its U8 tensors name the matrices to round (the language
model's, say, with `--dtype llm=int4`). OUT_DIR must not exist. Formats, groups of 32 along K:
  q4_0  symmetric: d = (value of largest magnitude) / -8 in float16, q = round(x / d) + 8 in 0..15
        (victor's int4, ggml's Q4_0)
  q4_1  with the group's minimum: d = (max - min) / 15 and m = min, both float16,
        q = round((x - m) / d) in 0..15, x' = q d + m (ggml's Q4_1; Q4_K keeps this shape with
        6-bit scales and minimums over 8 groups)
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

GROUP = 32
MAX_HEADER = 100 << 20


def fail(msg):
    sys.exit("int4_format_drift: " + msg)


def read_safetensors(path):
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                fail(f"{path}: shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > min(MAX_HEADER, size - 8):
                fail(f"{path}: header length {n} exceeds the file or {MAX_HEADER} bytes")
            header = json.loads(f.read(n))
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        if not 0 <= s <= e <= len(data):
            fail(f"{path}: tensor {name} lies outside the file")
    return header, data


def f16(x):
    return x.astype(np.float16).astype(np.float32)


def groups(w):
    rows, k = w.shape
    g = (k + GROUP - 1) // GROUP
    wp = np.zeros((rows, g * GROUP), np.float32)
    wp[:, :k] = w
    if k % GROUP:  # padding must not widen the last group's range: repeat its first value
        wp[:, k:] = wp[:, (g - 1) * GROUP:(g - 1) * GROUP + 1]
    return wp.reshape(rows, g, GROUP)


def inverse(d):
    return np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)


def q4_0(w):
    wp = groups(w)
    if w.shape[1] % GROUP:  # victor pads with zeros, which never win the largest magnitude
        wp[:, -1, w.shape[1] % GROUP:] = 0
    m = np.take_along_axis(wp, np.abs(wp).argmax(2)[..., None], 2)
    d = f16(m / -8.0)
    n = np.clip(np.round(wp * inverse(d)) + 8, 0, 15)
    return ((n - 8) * d).reshape(w.shape[0], -1)[:, : w.shape[1]]


def q4_1(w):
    wp = groups(w)
    lo, hi = wp.min(2, keepdims=True), wp.max(2, keepdims=True)
    d, m = f16((hi - lo) / 15.0), f16(lo)
    n = np.clip(np.round((wp - m) * inverse(d)), 0, 15)
    return (n * d + m).reshape(w.shape[0], -1)[:, : w.shape[1]]


def main():
    if len(sys.argv) != 5 or sys.argv[4] not in ("q4_0", "q4_1"):
        sys.exit(__doc__)
    src, int4_dir, out, fmt = sys.argv[1:]
    if os.path.exists(out):
        fail(f"{out} exists: give a new folder")
    header, data = read_safetensors(os.path.join(src, "model.safetensors"))
    int4_header, _ = read_safetensors(os.path.join(int4_dir, "model.safetensors"))
    names = {k for k, v in int4_header.items() if k != "__metadata__" and v.get("dtype") == "U8"}
    if not names:
        fail(f"{int4_dir}: no int4 (U8) matrices: write it with victor quantize --dtype ...int4")
    missing = sorted(names - header.keys())
    if missing:
        fail(f"{src} lacks {missing[0]}, an int4 matrix of {int4_dir}: not the same model")
    rounding = {"q4_0": q4_0, "q4_1": q4_1}[fmt]
    tmp = out + ".tmp-" + str(os.getpid())
    os.makedirs(tmp)
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if f != "model.safetensors" and os.path.isfile(p) and not f.startswith("trainer_state"):
            shutil.copy(p, tmp)
    out_header, offset, errors = {}, 0, []
    order = [k for k in header if k != "__metadata__"]
    for k in order:
        info = header[k]
        s, e = info["data_offsets"]
        if k in names:
            if info["dtype"] != "F32":
                fail(f"{src}: {k} is {info['dtype']}, not F32")
            w = np.frombuffer(data[s:e], np.float32).reshape(info["shape"])
            wq = rounding(w).astype(np.float32)
            errors.append(float(np.sqrt(((wq - w) ** 2).mean() / max((w**2).mean(), 1e-30))))
            info = dict(info, rounded=wq)
        out_header[k] = info
    meta = {k: {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [0, 0]} for k, v in out_header.items()}
    for k in order:
        n = out_header[k]["data_offsets"][1] - out_header[k]["data_offsets"][0]
        meta[k]["data_offsets"] = [offset, offset + n]
        offset += n
    if "__metadata__" in header:
        meta["__metadata__"] = header["__metadata__"]
    blob = json.dumps(meta).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in order:
            info = out_header[k]
            if "rounded" in info:
                f.write(info["rounded"].tobytes())
            else:
                s, e = info["data_offsets"]
                f.write(data[s:e].tobytes())
    os.rename(tmp, out)
    print(f"{fmt}: {len(errors)} matrices rounded; relative RMS error of the weights "
          f"mean {np.mean(errors):.4f}, max {np.max(errors):.4f}")


if __name__ == "__main__":
    main()
