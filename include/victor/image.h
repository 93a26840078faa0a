// LLaVA-1.5 image preprocessing into tensors; decoding and the pixel steps are in image_io.h.
#pragma once
#include <torch/torch.h>

#include "victor/image_io.h"

namespace victor {

// Resize with PIL's bicubic (a = -0.5, antialiased when shrinking), output float [H,W,3] in 0..255.
torch::Tensor resize_bicubic(const Image& img, int out_w, int out_h);
// Full LLaVA-1.5 preprocessing: [3, crop, crop] float, normalized.
torch::Tensor preprocess_image(const Image& img, const PreprocessConfig& p);

}  // namespace victor
