// Functions shared by the model's files but not part of the public API.
#pragma once
#include "victor/model.h"
#include "victor/ops.h"

namespace victor {

// CLIP-style ViT up to `layers` blocks: [n,3,S,S] -> hidden_states[layers] ([n,1+N,D]).
torch::Tensor vision_forward(const VisionW& w, const VisionConfig& c, const torch::Tensor& pixels,
                             int layers);

// One LLaMA decoder layer over x [B,T,d]; keys from the cache when given (appended first).
// `rope` holds the tables for meta.pos. `allowed` ([B,T,S]) is reused when defined, else computed
// and stored: it is the same for every layer on the same side of the drop (their caches receive
// identical appends and compactions).
torch::Tensor llama_layer(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode, int layer,
                          const torch::Tensor& x, const TokenMeta& meta, const RopeTables& rope,
                          torch::Tensor& allowed, LayerCache* cache, ForwardTrace* trace);

}  // namespace victor
