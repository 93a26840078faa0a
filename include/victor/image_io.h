// Images without LibTorch: decoding (PNG/JPEG/BMP via stb), PNG encoding, and the pixel steps of
// LLaVA-1.5's preprocessing (pad to square, PIL's bicubic resize, the crop geometry). The fuzz
// build links these alone; image.h adds the tensor side.
#pragma once
#include <array>
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

// Largest image decoded (width x height): the header is read first, so a file that claims more
// is refused before any pixel memory is allocated. 64 Mpx (192 MiB of RGB) is far above any
// photograph a VLM is given (LLaVA resizes to 336 x 336).
constexpr int64_t kMaxImagePixels = 64ll * 1024 * 1024;

Image decode_image(const std::string& bytes, const std::string& source);
Image load_image(const std::string& path);
// Width and height from the header alone (no pixels decoded); false when not an image.
bool image_dimensions(const std::string& bytes, int* width, int* height);
void save_png(const Image& img, const std::string& path);  // atomic
std::string encode_png(const Image& img);

// Pad to a square with `fill`, the image centred (LLaVA's expand2square).
Image pad_to_square(const Image& img, const uint8_t fill[3]);
// PIL's bicubic (a = -0.5, antialiased when shrinking) into out_h * out_w * 3 floats in 0..255.
void resize_bicubic_into(const Image& img, int out_w, int out_h, float* out);

// The resize and center crop of preprocess_image for a width x height image: the size after
// resizing (shortest edge to `shortest_edge`, aspect kept, Hugging Face's rule) and the crop's corner.
struct ResizeCrop {
  int width, height, top, left;
};
ResizeCrop resize_crop(int width, int height, const PreprocessConfig& p);

// Where a box normalized to a width x height image lands in preprocess_image's output, normalized
// to the crop (pad-to-square, resize, center crop), clipped to it; false when nothing of it is left.
bool box_in_input(const std::array<float, 4>& box, int width, int height, const PreprocessConfig& p,
                  std::array<float, 4>* out);

}  // namespace victor
