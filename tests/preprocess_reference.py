#!/usr/bin/python3
# transformers' CLIPImageProcessor / LlavaImageProcessor steps written out with PIL and NumPy
# alone (convert_to_rgb, pad_to_square with int(mean * 255), resize of the shortest edge with PIL
# bicubic on uint8, center crop, rescale in float64 -> float32, normalize in float32): the
# reference victor's preprocessing is tested against (tests/test_io.cpp). Writes [3, crop, crop]
# float32 as .npy. Mode anyres does LlavaNextImageProcessor's AnyRes (select_best_resolution,
# get_patch_output_size, resize, pad with zeros centred, divide_to_patches, the base view resized
# to SHORTEST_EDGE squared) and writes [views, 3, crop, crop].
#   preprocess_reference.py IMAGE OUT.npy pad|crop|anyres SHORTEST_EDGE CROP_SIZE [PINPOINTS_JSON]
import json
import math
import sys

import numpy as np
from PIL import Image

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]

path, out, mode, shortest, crop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
a = np.array(Image.open(path).convert("RGB"))


def normalize(v):
    x = (v.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)


if mode == "anyres":
    pins = json.loads(sys.argv[6])
    oh, ow = a.shape[:2]
    best, best_eff, best_waste = None, 0, float("inf")
    for th, tw in pins:
        scale = min(tw / ow, th / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = th * tw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (th, tw), eff, waste
    th, tw = best
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nh, nw = th, min(math.ceil(ow * sh), tw)
    r = np.array(Image.fromarray(a).resize((nw, nh), resample=Image.BICUBIC))
    py, ry = divmod(th - nh, 2)
    px, rx = divmod(tw - nw, 2)
    padded = np.pad(r, ((py, py + ry), (px, px + rx), (0, 0)), mode="constant", constant_values=0)
    patches = [padded[i:i + crop, j:j + crop] for i in range(0, th, crop) for j in range(0, tw, crop)]
    base = np.array(Image.fromarray(a).resize((shortest, shortest), resample=Image.BICUBIC))
    np.save(out, np.stack([normalize(v) for v in [base] + patches]))
    sys.exit(0)
if mode == "pad":
    h, w = a.shape[:2]
    if h != w:
        side = max(h, w)
        sq = np.zeros((side, side, 3), dtype=a.dtype)
        for c in range(3):
            sq[:, :, c] = int(MEAN[c] * 255)
        if w > h:
            start = (side - h) // 2
            sq[start:start + h, :, :] = a
        else:
            start = (side - w) // 2
            sq[:, start:start + w, :] = a
        a = sq
h, w = a.shape[:2]
short, long = (w, h) if w <= h else (h, w)
new_long = int(shortest * long / short)
new_w, new_h = (shortest, new_long) if w <= h else (new_long, shortest)
a = np.array(Image.fromarray(a).resize((new_w, new_h), resample=Image.BICUBIC))
top, left = (new_h - crop) // 2, (new_w - crop) // 2
a = a[top:top + crop, left:left + crop]
x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
np.save(out, np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32))
