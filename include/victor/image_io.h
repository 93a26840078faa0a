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

// --- LLaVA-NeXT's AnyRes geometry (transformers' image_processing_utils / modeling_llava_next) ---

// select_best_resolution: the pinpoint (height, width) keeping the most of the image's pixels when
// it is scaled to fit, ties broken by the least wasted area, then by the earlier entry.
Pinpoint select_best_resolution(int height, int width, const std::vector<Pinpoint>& pinpoints);
// get_patch_output_size: the image's size (height, width) scaled to fit `target`, aspect kept.
std::array<int, 2> patch_output_size(int height, int width, const Pinpoint& target);
// unpad_image on a cur_h x cur_w feature grid of an orig_h x orig_w image: the rows and columns
// that show the image (the padding of resize-and-pad removed, with transformers' rounding).
struct GridRegion {
  int top, height, left, width;
};
GridRegion unpad_region(int cur_h, int cur_w, int orig_h, int orig_w);
// Rows one image gives the language model on LLaVA-NeXT with `side` x `side` features per view:
// the base view, then the crops' grid unpadded with an image_newline after each of its rows (the
// base view alone: its features and one newline).
int64_t next_packed_rows(const ImageLayout& layout, int side);
// Rows one image of this layout gives the language model before any decoder layer: LLaVA-NeXT's
// packed rows, or LLaVA-1.5's visual_tokens_per_image.
int64_t image_rows(const ModelConfig& c, const ImageLayout& layout);
// Features per side of one view after the reducer's pre-LLM step (pooling shrinks it).
int next_view_side(const ModelConfig& c);
// The layout of a width x height image on `c` (LLaVA-1.5: the base view alone): the best pinpoint
// among those within the cap (preprocess.max_crops / max_image_tokens), the base view alone when
// none is; an error when even that exceeds max_image_tokens.
ImageLayout image_layout(int width, int height, const ModelConfig& c);

}  // namespace victor
