// libFuzzer: image decoding (stb, compiled here with the sanitizers) and LLaVA's pixel steps.
// An image or a victor::Error naming the source; a decoded image has the pixels its size says and
// the header-only reading agrees with it; pad, resize and box mapping stay in range.
#include <cstdlib>
#include <string>
#include <vector>

#include "victor/error.h"
#include "victor/image_io.h"

using namespace victor;

#define CHECK(c) \
  if (!(c)) abort()

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  // A few bytes can declare a huge image (stb and libjpeg fill what the file lacks): decoding
  // 64 Mpx under ASan takes seconds. Such headers are checked, not decoded, so the fuzzer spends
  // its time on the parsers' branches instead of on memset.
  int hw = 0, hh = 0;
  if (image_dimensions(bytes, &hw, &hh) && int64_t(hw) * hh > (int64_t(1) << 20)) return 0;
  Image img;
  try {
    img = decode_image(bytes, "fuzz.png");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).rfind("fuzz.png", 0) == 0);
    return 0;
  }
  CHECK(img.width > 0 && img.height > 0 && int64_t(img.width) * img.height <= kMaxImagePixels);
  CHECK(img.rgb.size() == size_t(img.width) * img.height * 3);
  int w = 0, h = 0;
  CHECK(image_dimensions(bytes, &w, &h) && w == img.width && h == img.height);
  // Keep each run fast: the padded square is what the resize reads (a 24 x 8208 strip pads to
  // 67 Mpx: found by fuzzing, now refused by pad_to_square; checked on the unpadded image below).
  PreprocessConfig p;
  p.shortest_edge = 12;
  p.crop_size = 12;
  if (std::max(img.width, img.height) <= 256) {
    const uint8_t fill[3] = {1, 2, 3};
    Image sq = pad_to_square(img, fill);
    CHECK(sq.width == sq.height && sq.width == std::max(img.width, img.height));
    const ResizeCrop rc = resize_crop(sq.width, sq.height, p);
    CHECK(rc.width >= p.crop_size && rc.height >= p.crop_size && rc.top >= 0 && rc.left >= 0);
    std::vector<float> out(size_t(rc.width) * rc.height * 3);
    resize_bicubic_into(sq, rc.width, rc.height, out.data());
    for (float v : out) CHECK(v >= 0 && v <= 255);
    CHECK(decode_image(encode_png(img), "again.png").rgb == img.rgb);  // PNG round trip is lossless
  }
  // The geometry on the image as it is (no padding): refused or bounded, never an overflow.
  try {
    const ResizeCrop rc = resize_crop(img.width, img.height, p);
    CHECK(int64_t(rc.width) * rc.height <= kMaxImagePixels);
  } catch (const Error&) {
  }
  std::array<float, 4> box{0.1f, 0.2f, 0.7f, 0.9f}, mapped{};
  if (box_in_input(box, img.width, img.height, p, &mapped))
    for (float v : mapped) CHECK(v >= 0 && v <= 1);
  return 0;
}
