// Functions shared by the model's files but not part of the public API.
#pragma once
#include "victor/model.h"
#include "victor/ops.h"

namespace victor {

// CLIP-style ViT up to `layers` blocks: [n,3,S,S] -> hidden_states[layers] ([n,1+N,D]).
torch::Tensor vision_forward(const VisionW& w, const VisionConfig& c, const torch::Tensor& pixels,
                             int layers, VisionLastBlock* last = nullptr);

// FastV's ranking: the attention row of one query token per batch row, averaged over heads.
struct RankRequest {
  torch::Tensor query;   // [B] int64 index into the layer's rows
  torch::Tensor scores;  // out: [B,S] over the layer's keys
};

// One LLaMA decoder layer over x [B,T,d]; keys from the cache when given (appended first).
// `rope` holds the tables for meta.pos. `allowed` ([B,T,S]) is reused when defined, else computed
// and stored: it is the same for every layer on the same side of the drop (their caches receive
// identical appends and compactions).
torch::Tensor llama_layer(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode, int layer,
                          const torch::Tensor& x, const TokenMeta& meta, const RopeTables& rope,
                          torch::Tensor& allowed, LayerCache* cache, ForwardTrace* trace,
                          RankRequest* rank = nullptr);

// One decode token per row of x [B,1,d], each row with its own cache (requests of different
// lengths decoding together): the projections run batched, attention per row over its own keys.
// metas[b] is row b's [1,1] metadata; rope holds the tables for the rows' positions [B,1].
torch::Tensor llama_layer_rows(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode,
                               const torch::Tensor& x, const std::vector<TokenMeta>& metas,
                               const RopeTables& rope, const std::vector<LayerCache*>& caches);

// The decode fast path: one new token per row of x [B,1,d] (float32, no autograd). Row b's keys
// are batch row rows[b].row of rows[b].cache (a cache shared by several rows must have all of its
// rows here: its length grows once). llama_layer, llama_layer_rows and this run one decoder-layer
// recipe (llama.cpp); this one takes its elementwise steps and the cache append on raw buffers
// (rms_norm_rows, rope_rows) and attention through kernels::attend_decode (tests: incremental
// decode equals a full recompute).
struct DecodeRow {
  LayerCache* cache;
  int64_t row;    // batch row inside cache
  int64_t order;  // the new token's order and position
  int64_t pos;
};
struct DecodeRope {
  std::vector<float> cos, sin;  // [B, hd/2], the same values rope_tables computes
};
DecodeRope decode_rope(const std::vector<int64_t>& pos, int64_t hd, double theta);
// Whether a layer's cache can take the fast path (prefilled, contiguous, float32 or bf16 storage).
bool decode_fast_path_ok(const LayerCache& c);
torch::Tensor llama_layer_decode(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode,
                                 const torch::Tensor& x, const DecodeRope& rope,
                                 const std::vector<DecodeRow>& rows);

}  // namespace victor
