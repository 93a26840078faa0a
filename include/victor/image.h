// Image decoding (PNG/JPEG/BMP) and LLaVA-1.5 preprocessing.
#pragma once
#include <array>
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "victor/config.h"

namespace victor {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height * width * 3
  uint8_t at(int y, int x, int c) const { return rgb[(size_t(y) * width + x) * 3 + c]; }
};

Image decode_image(const std::string& bytes, const std::string& source);
Image load_image(const std::string& path);
// Width and height from the header alone (no pixels decoded); false when not an image.
bool image_dimensions(const std::string& bytes, int* width, int* height);
void save_png(const Image& img, const std::string& path);  // atomic
std::string encode_png(const Image& img);

// Pad to a square with `fill`, the image centred (LLaVA's expand2square).
Image pad_to_square(const Image& img, const uint8_t fill[3]);
// Resize with PIL's bicubic (a = -0.5, antialiased when shrinking), output float [H,W,3] in 0..255.
torch::Tensor resize_bicubic(const Image& img, int out_w, int out_h);
// Full LLaVA-1.5 preprocessing: [3, crop, crop] float, normalized.
torch::Tensor preprocess_image(const Image& img, const PreprocessConfig& p);
// Where a box normalized to a width x height image lands in preprocess_image's output, normalized
// to the crop (pad-to-square, resize, center crop), clipped to it; false when nothing of it is left.
bool box_in_input(const std::array<float, 4>& box, int width, int height, const PreprocessConfig& p,
                  std::array<float, 4>* out);

}  // namespace victor
