// Functions shared by the model's files but not part of the public API.
#pragma once
#include "victor/model.h"

namespace victor {

// CLIP-style ViT up to `layers` blocks: [n,3,S,S] -> hidden_states[layers] ([n,1+N,D]).
torch::Tensor vision_forward(const VisionW& w, const VisionConfig& c, const torch::Tensor& pixels,
                             int layers);

// One LLaMA decoder layer over x [B,T,d]; keys from the cache when given (appended first).
torch::Tensor llama_layer(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode, int layer,
                          const torch::Tensor& x, const TokenMeta& meta, LayerCache* cache,
                          ForwardTrace* trace);

}  // namespace victor
