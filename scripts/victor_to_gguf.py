#!/usr/bin/env python3
"""Writes a float32 victor (llava-hf layout) folder as llama.cpp GGUF files, for side-by-side
benchmarks on the same weights (docs/benchmarks.md). Uses llama.cpp's own gguf-py
(PYTHONPATH=<llama.cpp>/gguf-py) and NumPy.

  python3 scripts/victor_to_gguf.py MODEL_DIR OUT.gguf [f32|f16]
      the language model; its tokenizer is a placeholder vocabulary of the model's size
      (llama-bench times token ids, not text). Quantize the result with llama-quantize.
  python3 scripts/victor_to_gguf.py --mmproj MODEL_DIR OUT.gguf [f32|f16]
      the vision tower up to the layer LLaVA reads and the projector, as llama-mtmd-cli's
      `--mmproj` (projector_type mlp; a LLaVA-NeXT folder adds its image_grid_pinpoints,
      spatial_unpad and image_newline, as llava-v1.6's mmproj files hold them).

The folder may hold F32 or BF16 tensors; the GGUF's matrices are F32 (default) or F16 (half the
file, for 7B shapes), its norms F32; the patch embedding is always F16 (as llama.cpp writes it).
"""
import json
import os
import struct
import sys

import numpy as np
import gguf


def tensors(folder):
    """name -> float32 array, over every *.safetensors file of the folder (memory-mapped)."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".safetensors"):
            continue
        path = os.path.join(folder, f)
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in ("F32", "BF16"):
                sys.exit(f"{path}: tensor {name} is {info['dtype']}; write the folder with --dtype f32 or bf16")
            b, e = info["data_offsets"]
            dt = np.float32 if info["dtype"] == "F32" else np.uint16
            out[name] = (info["dtype"], np.memmap(path, dtype=dt, mode="r", offset=base + b,
                                                  shape=tuple(info["shape"])))
    return out


def as_f32(entry):
    kind, a = entry
    if kind == "F32":
        return a
    return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)  # bfloat16 -> float32 exactly


def permute(w, heads):
    # Hugging Face's LLaMA keeps each head's rotary pairs as halves; GGUF interleaves them.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_mmproj(folder, out, half):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    pre = json.load(open(os.path.join(folder, "preprocessor_config.json")))
    v = cfg["vision_config"]
    raw = tensors(folder)
    root = "model." if "model.image_newline" in raw or "model.multi_modal_projector.linear_1.weight" in raw else ""
    vt = root + "vision_tower.vision_model."
    mm = root + "multi_modal_projector."
    n_layers = v["num_hidden_layers"]
    select = cfg.get("vision_feature_layer", -2)
    if not isinstance(select, int):
        sys.exit(f"{folder}: vision_feature_layer {select!r}: only one layer is written")
    # llama.cpp counts feature layers from the embeddings' output (0) on, and keeps that many blocks.
    feature = select if select >= 0 else n_layers + select + 1
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        sys.exit(f"{folder}: vision_feature_select_strategy other than 'default' is not written")
    if v.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        sys.exit(f"{folder}: vision hidden_act {v.get('hidden_act')!r} is not written")
    w = gguf.GGUFWriter(out, "clip")
    w.add_name("victor-random-mmproj")
    w.add_file_type(1 if half else 0)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", v["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", cfg["text_config"]["hidden_size"])
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.get("layer_norm_eps", 1e-5)))
    w.add_uint32("clip.vision.block_count", feature)
    w.add_array("clip.vision.feature_layer", [feature])
    w.add_bool("clip.use_gelu", v.get("hidden_act") == "gelu")
    w.add_array("clip.vision.image_mean", [float(x) for x in pre["image_mean"]])
    w.add_array("clip.vision.image_std", [float(x) for x in pre["image_std"]])
    if "image_grid_pinpoints" in cfg:
        w.add_array("clip.vision.image_grid_pinpoints", [int(x) for hw in cfg["image_grid_pinpoints"] for x in hw])
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")

    def add(name, arr, matrix=False):
        dtype = np.float16 if half and matrix else np.float32
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=dtype))

    add("v.class_embd", as_f32(raw[vt + "embeddings.class_embedding"]))
    w.add_tensor("v.patch_embd.weight", np.ascontiguousarray(as_f32(raw[vt + "embeddings.patch_embedding.weight"]),
                                                             dtype=np.float16))
    add("v.position_embd.weight", as_f32(raw[vt + "embeddings.position_embedding.weight"]))
    add("v.pre_ln.weight", as_f32(raw[vt + "pre_layrnorm.weight"]))
    add("v.pre_ln.bias", as_f32(raw[vt + "pre_layrnorm.bias"]))
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(feature):
        for src, dst in parts.items():
            for kind in ("weight", "bias"):
                arr = as_f32(raw[f"{vt}encoder.layers.{i}.{src}.{kind}"])
                add(f"v.blk.{i}.{dst}.{kind}", arr, matrix=arr.ndim == 2)
    for src, dst in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        add(dst + ".weight", as_f32(raw[f"{mm}{src}.weight"]), matrix=True)
        add(dst + ".bias", as_f32(raw[f"{mm}{src}.bias"]))
    if root + "image_newline" in raw:
        add("v.image_newline", as_f32(raw[root + "image_newline"]))
    elif "image_grid_pinpoints" in cfg:
        sys.exit(f"{folder}: a LLaVA-NeXT folder without image_newline")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {out}: {feature} vision blocks and the projector")


def main():
    args = sys.argv[1:]
    mmproj = bool(args) and args[0] == "--mmproj"
    if mmproj:
        args = args[1:]
    if len(args) not in (2, 3) or (len(args) == 3 and args[2] not in ("f32", "f16")):
        sys.exit(__doc__)
    folder, out = args[0], args[1]
    half = len(args) == 3 and args[2] == "f16"
    if os.path.exists(out):
        sys.exit(f"{out} exists; remove it first (this script does not overwrite files)")
    if mmproj:
        return write_mmproj(folder, out, half)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    t = cfg["text_config"]
    d, L, H = t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]
    Hkv, V = t.get("num_key_value_heads", H), t["vocab_size"]
    raw = tensors(folder)

    def tensor(name):  # float32 view, one tensor at a time
        return as_f32(raw[name])

    p = "language_model.model."
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("victor-random")
    w.add_context_length(t.get("max_position_embeddings", 2048))
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(t["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(d // H)
    w.add_rope_freq_base(float(t.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(t.get("rms_norm_eps", 1e-5)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(V)
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"t{i}" for i in range(V - len(toks))]
    w.add_token_list(toks[:V])
    w.add_token_scores([0.0] * V)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (V - 259)
    w.add_token_types(types[:V])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, arr):
        dtype = np.float16 if half and arr.ndim == 2 else np.float32
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=dtype))

    add("token_embd.weight", tensor(p + "embed_tokens.weight"))
    add("output_norm.weight", tensor(p + "norm.weight"))
    head = "language_model.lm_head.weight" if "language_model.lm_head.weight" in raw else p + "embed_tokens.weight"
    add("output.weight", tensor(head))
    for i in range(L):
        q = f"{p}layers.{i}."
        add(f"blk.{i}.attn_norm.weight", tensor(q + "input_layernorm.weight"))
        add(f"blk.{i}.attn_q.weight", permute(tensor(q + "self_attn.q_proj.weight"), H))
        add(f"blk.{i}.attn_k.weight", permute(tensor(q + "self_attn.k_proj.weight"), Hkv))
        add(f"blk.{i}.attn_v.weight", tensor(q + "self_attn.v_proj.weight"))
        add(f"blk.{i}.attn_output.weight", tensor(q + "self_attn.o_proj.weight"))
        add(f"blk.{i}.ffn_norm.weight", tensor(q + "post_attention_layernorm.weight"))
        add(f"blk.{i}.ffn_gate.weight", tensor(q + "mlp.gate_proj.weight"))
        add(f"blk.{i}.ffn_up.weight", tensor(q + "mlp.up_proj.weight"))
        add(f"blk.{i}.ffn_down.weight", tensor(q + "mlp.down_proj.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
