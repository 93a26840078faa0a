// LLaVA-1.5 image preprocessing into tensors; decoding and the pixel steps are in image_io.h.
#pragma once
#include <torch/torch.h>

#include "victor/image_io.h"

namespace victor {

// Resize with PIL's bicubic (a = -0.5, antialiased when shrinking), output float [H,W,3] in 0..255.
torch::Tensor resize_bicubic(const Image& img, int out_w, int out_h);
// Full LLaVA-1.5 preprocessing: [3, crop, crop] float, normalized.
torch::Tensor preprocess_image(const Image& img, const PreprocessConfig& p);

// An image ready for the vision tower: its views [views,3,S,S] and how they were cut.
struct PreparedImage {
  torch::Tensor pixels;
  ImageLayout layout;
};
// The checkpoint's own preprocessing: LLaVA-1.5's one view (preprocess_image), or LLaVA-NeXT's
// AnyRes as LlavaNextImageProcessor does it: the base view (the whole image resized to
// shortest_edge x shortest_edge), then the crops, row by row, of the image resized into the chosen
// pinpoint (aspect kept, PIL bicubic) and padded with black to it, centred.
PreparedImage prepare_image(const Image& img, const ModelConfig& c);

}  // namespace victor
