// Image decoding, PNG encoding, LLaVA's pad-to-square, PIL's bicubic resize and the crop
// geometry: no LibTorch (the fuzz build links this file alone). The torch side is image.cpp.
#include <algorithm>
#include <cmath>
#include <limits>

#include <csetjmp>
#include <cstdio>
#include <memory>

#include <jpeglib.h>
#include <jerror.h>

#include "stb_image.h"
#include "stb_image_write.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/image_io.h"

namespace victor {

namespace {

bool is_jpeg(const std::string& bytes) { return bytes.compare(0, 3, "\xff\xd8\xff") == 0; }
// A chunk type as printable text (it comes from the file).
std::string sanitize_chunk_type(const std::string& t) {
  std::string out;
  for (char c : t) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}
bool is_png(const std::string& bytes) { return bytes.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)) == 0; }

// stb grows its compressed-data buffer to a chunk's DECLARED length before reading the chunk, so
// a 200-byte PNG whose IDAT claims 2 GB made it allocate 2 GB and then fail (found by fuzz_image,
// 2026-12-03): a request-sized file could take the server's memory. Every chunk up to IEND must
// lie inside the file (and its length be at most 2^31 - 1, as the PNG specification says), which
// bounds what stb allocates by twice the file's size.
void check_png_chunks(const std::string& bytes, const std::string& source) {
  size_t at = 8;
  while (true) {
    if (bytes.size() - at < 8)
      throw Error(source + ": not a readable image (PNG: truncated before its IEND chunk)");
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data()) + at;
    const uint32_t length = uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
    const std::string type(bytes, at + 4, 4);
    if (type == "IEND") return;  // stb stops here, before the IEND's own checksum
    const size_t left = bytes.size() - at - 8;  // for the data and its 4-byte checksum
    if (length > 0x7fffffffu || size_t(length) + 4 > left)
      throw Error(source + ": not a readable image (PNG: chunk '" + sanitize_chunk_type(type) + "' declares " +
                  std::to_string(length) + " bytes, the file has " + std::to_string(left < 4 ? 0 : left - 4) +
                  " left)");
    at += 12 + size_t(length);
  }
}


// Only the formats victor documents reach a decoder (stb also parses TGA, PSD, HDR, PIC, PNM, GIF:
// decoders nobody here needs are attack surface, and TGA has no magic number to tell it by).
bool known_format(const std::string& bytes) {
  const bool bmp = bytes.compare(0, 2, "BM") == 0;
  return is_png(bytes) || is_jpeg(bytes) || bmp;
}

// JPEG goes to libjpeg-turbo (the decoder PIL, and so transformers' LLaVA preprocessing, uses;
// OSS-Fuzzed upstream), not to stb: fuzzing found stb's Huffman table builder (Debian's v2.27)
// reading past its 257-entry size array on a crafted DHT segment. libjpeg reports errors through
// longjmp: only plain data lives across the setjmp below.
struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegError*>(c->err);
  (*c->err->format_message)(c, e->message);
  std::longjmp(e->jump, 1);
}

// Warnings (e.g. extraneous bytes) are not errors, as in PIL; but a file that ends inside its
// data is refused as PIL refuses it ("image file is truncated"), not decoded with grey fill.
void jpeg_quiet(j_common_ptr c, int level) {
  if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF) {
    auto* e = reinterpret_cast<JpegError*>(c->err);
    std::snprintf(e->message, sizeof e->message, "truncated: the file ends inside the image data");
    std::longjmp(e->jump, 1);
  }
}

// Decodes (pixels != nullptr) or reads only the header; the size is checked before any pixel
// memory is allocated. Returns false with `why` set when libjpeg refuses the data.
bool run_jpeg(const std::string& bytes, int* width, int* height, std::vector<uint8_t>* pixels, std::string* why) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_quiet;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    *why = err.message;
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  *width = int(cinfo.image_width);
  *height = int(cinfo.image_height);
  if (!pixels || *width <= 0 || *height <= 0 || int64_t(*width) * *height > kMaxImagePixels) {
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  cinfo.out_color_space = JCS_RGB;  // grayscale and YCbCr become RGB (CMYK is refused by libjpeg)
  jpeg_start_decompress(&cinfo);
  if (cinfo.output_components != 3 || int(cinfo.output_width) != *width || int(cinfo.output_height) != *height) {
    jpeg_destroy_decompress(&cinfo);
    *why = "unexpected output layout";
    return false;
  }
  pixels->resize(size_t(*width) * size_t(*height) * 3);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = pixels->data() + size_t(cinfo.output_scanline) * size_t(*width) * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

void check_size(int w, int h, const std::string& source) {
  if (w <= 0 || h <= 0 || int64_t(w) * h > kMaxImagePixels)
    throw Error(source + ": image of " + std::to_string(w) + " x " + std::to_string(h) +
                " pixels is larger than victor decodes (" + std::to_string(kMaxImagePixels >> 20) + " Mpx)");
}

}  // namespace

Image decode_image(const std::string& bytes, const std::string& source) {
  if (bytes.empty()) throw Error(source + ": empty file, not an image");
  if (bytes.size() > size_t(std::numeric_limits<int>::max()))
    throw Error(source + ": " + std::to_string(bytes.size() >> 20) + " MiB is too large for an image");
  if (!known_format(bytes))
    throw Error(source + ": not a readable image (not PNG, JPEG or BMP by its first bytes)");
  int w = 0, h = 0, ch = 0;
  if (is_jpeg(bytes)) {
    Image img;
    std::string why;
    // run_jpeg reads the header and stops before allocating pixels for a size over the limit,
    // which check_size then refuses: the file is parsed once.
    if (!run_jpeg(bytes, &img.width, &img.height, &img.rgb, &why))
      throw Error(source + ": not a readable image (JPEG: " + why + ")");
    check_size(img.width, img.height, source);
    return img;
  }
  if (is_png(bytes)) check_png_chunks(bytes, source);
  // The header first: a file that claims a huge image is refused before pixels are allocated.
  if (stbi_info_from_memory(reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()),
                            &w, &h, &ch))
    check_size(w, h, source);
  unsigned char* data = stbi_load_from_memory(reinterpret_cast<const unsigned char*>(bytes.data()),
                                              static_cast<int>(bytes.size()), &w, &h, &ch, 3);
  if (!data)
    throw Error(source + ": not a readable image (" + std::string(stbi_failure_reason()) +
                "); PNG, JPEG and BMP are supported");
  Image img;
  img.width = w;
  img.height = h;
  img.rgb.assign(data, data + size_t(w) * h * 3);
  stbi_image_free(data);
  return img;
}

bool image_dimensions(const std::string& bytes, int* width, int* height) {
  int ch = 0;
  // A PNG's size is in its IHDR: read there, so a header declaring 100000 x 100000 (which stb's
  // own limits call unreadable) is known as too large, not as broken.
  if (is_png(bytes) && bytes.size() >= 24 && bytes.compare(12, 4, "IHDR") == 0) {
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
    auto be32 = [&](size_t at) { return uint32_t(p[at]) << 24 | uint32_t(p[at + 1]) << 16 | uint32_t(p[at + 2]) << 8 | p[at + 3]; };
    const uint32_t w = be32(16), h = be32(20);
    if (w == 0 || h == 0) return false;
    *width = int(std::min<uint32_t>(w, uint32_t(std::numeric_limits<int>::max())));
    *height = int(std::min<uint32_t>(h, uint32_t(std::numeric_limits<int>::max())));
    return true;
  }
  if (is_jpeg(bytes)) {
    std::string why;
    return run_jpeg(bytes, width, height, nullptr, &why);
  }
  return known_format(bytes) && bytes.size() <= size_t(std::numeric_limits<int>::max()) &&
         stbi_info_from_memory(reinterpret_cast<const unsigned char*>(bytes.data()),
                               static_cast<int>(bytes.size()), width, height, &ch) != 0;
}

Image load_image(const std::string& path) { return decode_image(read_file(path, FileKind::Image), path); }

std::string encode_png(const Image& img) {
  std::string out;
  auto sink = [](void* ctx, void* data, int size) {
    static_cast<std::string*>(ctx)->append(static_cast<const char*>(data), size_t(size));
  };
  if (!stbi_write_png_to_func(sink, &out, img.width, img.height, 3, img.rgb.data(), img.width * 3))
    throw Error("PNG encoding failed");
  return out;
}

void save_png(const Image& img, const std::string& path) { write_file_atomic(path, encode_png(img)); }

Image pad_to_square(const Image& img, const uint8_t fill[3]) {
  if (img.width == img.height) return img;
  int side = std::max(img.width, img.height);
  // A thin strip (found by fuzzing: 24 x 8208 pixels in a 909-byte BMP) pads to a square of its
  // long side: bounded like a decoded image, or a 1 x 60000 PNG would ask for 10 GB.
  if (int64_t(side) * side > kMaxImagePixels)
    throw Error("image of " + std::to_string(img.width) + " x " + std::to_string(img.height) +
                " pixels: padded to a square it would be " + std::to_string(side) + " x " + std::to_string(side) +
                ", more than victor processes (" + std::to_string(kMaxImagePixels >> 20) + " Mpx)");
  Image out;
  out.width = out.height = side;
  out.rgb.resize(size_t(side) * side * 3);
  for (size_t i = 0; i < out.rgb.size(); i += 3)
    for (int c = 0; c < 3; ++c) out.rgb[i + c] = fill[c];
  int ox = (side - img.width) / 2, oy = (side - img.height) / 2;
  for (int y = 0; y < img.height; ++y)
    std::copy(img.rgb.begin() + size_t(y) * img.width * 3,
              img.rgb.begin() + size_t(y + 1) * img.width * 3,
              out.rgb.begin() + (size_t(y + oy) * side + ox) * 3);
  return out;
}

namespace {

// PIL's bicubic kernel (a = -0.5).
double cubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// Pillow's 8-bit resampling works in fixed point: each weight times 2^22, rounded away from zero,
// sums started at half a unit, then shifted down and clipped (Resample.c, PRECISION_BITS).
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Taps {
  std::vector<int> start;
  std::vector<std::vector<int32_t>> w;
};

// Filter taps exactly as Pillow computes them: the support widens by the scale when shrinking
// (antialias), the kernel's argument is multiplied by 1 / filterscale, the weights normalized by
// their sum in double, then made fixed point.
Taps make_taps(int in, int out) {
  Taps t;
  const double scale = double(in) / out;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  const double ss = 1.0 / filterscale;
  for (int i = 0; i < out; ++i) {
    const double center = (i + 0.5) * scale;
    const int lo = std::max(int(center - support + 0.5), 0);
    const int hi = std::min(int(center + support + 0.5), in);
    std::vector<double> w;
    double sum = 0;
    for (int j = lo; j < hi; ++j) {
      const double v = cubic((j - center + 0.5) * ss);
      w.push_back(v);
      sum += v;
    }
    std::vector<int32_t> fixed;
    for (double v : w) {
      const double k = (sum != 0.0 ? v / sum : v) * double(1 << kPrecisionBits);
      fixed.push_back(int32_t(k < 0 ? -0.5 + k : 0.5 + k));
    }
    t.start.push_back(lo);
    t.w.push_back(std::move(fixed));
  }
  return t;
}

inline uint8_t clip8(int64_t acc) {
  if (acc >= (int64_t(1) << kPrecisionBits << 8)) return 255;
  if (acc <= 0) return 0;
  return uint8_t(acc >> kPrecisionBits);
}

}  // namespace

void resize_bicubic_into(const Image& img, int out_w, int out_h, float* o) {
  if (out_w <= 0 || out_h <= 0) throw Error("resize: output size must be positive");
  // Horizontal pass then vertical, each in Pillow's fixed point and rounded to 8 bits, so the
  // result equals PIL's Image.resize(..., BICUBIC) bit for bit (the test compares with Pillow).
  std::vector<uint8_t> mid;
  const std::vector<uint8_t>* rows = &img.rgb;
  if (out_w != img.width) {
    mid.resize(size_t(img.height) * out_w * 3);
    Taps tx = make_taps(img.width, out_w);
    for (int y = 0; y < img.height; ++y)
      for (int x = 0; x < out_w; ++x)
        for (int c = 0; c < 3; ++c) {
          int64_t acc = int64_t(1) << (kPrecisionBits - 1);
          for (size_t k = 0; k < tx.w[x].size(); ++k) acc += int64_t(tx.w[x][k]) * img.at(y, tx.start[x] + int(k), c);
          mid[(size_t(y) * out_w + x) * 3 + c] = clip8(acc);
        }
    rows = &mid;
  }
  const std::vector<uint8_t>& m = *rows;
  if (out_h == img.height) {
    for (size_t i = 0; i < size_t(out_h) * out_w * 3; ++i) o[i] = float(m[i]);
    return;
  }
  Taps ty = make_taps(img.height, out_h);
  for (int y = 0; y < out_h; ++y)
    for (int x = 0; x < out_w; ++x)
      for (int c = 0; c < 3; ++c) {
        int64_t acc = int64_t(1) << (kPrecisionBits - 1);
        for (size_t k = 0; k < ty.w[y].size(); ++k)
          acc += int64_t(ty.w[y][k]) * m[(size_t(ty.start[y] + int(k)) * out_w + x) * 3 + c];
        o[(size_t(y) * out_w + x) * 3 + c] = float(clip8(acc));
      }
}

ResizeCrop resize_crop(int width, int height, const PreprocessConfig& p) {
  const int short_side = std::min(width, height), long_side = std::max(width, height);
  if (short_side <= 0) throw Error("image of " + std::to_string(width) + " x " + std::to_string(height) + " pixels is empty");
  // The short side goes to shortest_edge: a thin strip's long side grows with it.
  const double long_d = double(p.shortest_edge) * long_side / short_side;
  if (long_d * p.shortest_edge > double(kMaxImagePixels))
    throw Error("image of " + std::to_string(width) + " x " + std::to_string(height) +
                " pixels: resized to a short side of " + std::to_string(p.shortest_edge) +
                " it would exceed " + std::to_string(kMaxImagePixels >> 20) + " Mpx (aspect ratio too extreme)");
  const int new_long = int(long_d);
  ResizeCrop r;
  r.width = width <= height ? p.shortest_edge : new_long;
  r.height = width <= height ? new_long : p.shortest_edge;
  r.top = (r.height - p.crop_size) / 2;
  r.left = (r.width - p.crop_size) / 2;
  return r;
}

bool box_in_input(const std::array<float, 4>& box, int width, int height, const PreprocessConfig& p,
                  std::array<float, 4>* out) {
  // The same geometry as preprocess_image, in pixels of each step: pad (pad_to_square's offsets), resize, crop.
  int w = width, h = height, ox = 0, oy = 0;
  if (p.pad_to_square && width != height) {
    w = h = std::max(width, height);
    ox = (w - width) / 2;
    oy = (h - height) / 2;
  }
  const ResizeCrop rc = resize_crop(w, h, p);
  const double sx = double(rc.width) / w, sy = double(rc.height) / h;
  auto fx = [&](float x) { return ((x * width + ox) * sx - rc.left) / p.crop_size; };
  auto fy = [&](float y) { return ((y * height + oy) * sy - rc.top) / p.crop_size; };
  std::array<float, 4> b{float(fx(box[0])), float(fy(box[1])), float(fx(box[2])), float(fy(box[3]))};
  for (auto& v : b) v = std::min(1.0f, std::max(0.0f, v));
  if (b[0] >= b[2] || b[1] >= b[3]) return false;
  *out = b;
  return true;
}

}  // namespace victor

namespace victor {

Pinpoint select_best_resolution(int height, int width, const std::vector<Pinpoint>& pinpoints) {
  if (height <= 0 || width <= 0) throw Error("AnyRes: the image is empty");
  if (pinpoints.empty()) throw Error("AnyRes: no image_grid_pinpoints to choose from");
  // As transformers computes it, in doubles with the downscaled size truncated to whole pixels.
  Pinpoint best = pinpoints[0];
  int64_t best_effective = 0;
  int64_t best_wasted = std::numeric_limits<int64_t>::max();
  for (const Pinpoint& p : pinpoints) {
    const double scale = std::min(double(p[1]) / width, double(p[0]) / height);
    const int64_t dw = int64_t(width * scale), dh = int64_t(height * scale);
    const int64_t effective = std::min(dw * dh, int64_t(width) * height);
    const int64_t wasted = int64_t(p[0]) * p[1] - effective;
    if (effective > best_effective || (effective == best_effective && wasted < best_wasted)) {
      best_effective = effective;
      best_wasted = wasted;
      best = p;
    }
  }
  return best;
}

std::array<int, 2> patch_output_size(int height, int width, const Pinpoint& target) {
  const double scale_w = double(target[1]) / width, scale_h = double(target[0]) / height;
  if (scale_w < scale_h)
    return {std::min(int(std::ceil(height * scale_w)), target[0]), target[1]};
  return {target[0], std::min(int(std::ceil(width * scale_h)), target[1])};
}

GridRegion unpad_region(int cur_h, int cur_w, int orig_h, int orig_w) {
  // Python's int(round(x, 7)): rounded to 7 decimals, then truncated.
  auto round7 = [](double x) { return int(std::floor(std::nearbyint(x * 1e7) / 1e7)); };
  const double original_aspect = double(orig_w) / orig_h, current_aspect = double(cur_w) / cur_h;
  if (original_aspect > current_aspect) {
    const int new_h = round7(orig_h * (double(cur_w) / orig_w));
    const int pad = (cur_h - new_h) / 2;
    return {pad, cur_h - 2 * pad, 0, cur_w};
  }
  const int new_w = round7(orig_w * (double(cur_h) / orig_h));
  const int pad = (cur_w - new_w) / 2;
  return {0, cur_h, pad, cur_w - 2 * pad};
}

int64_t next_packed_rows(const ImageLayout& l, int side) {
  const int64_t base = int64_t(side) * side;
  if (l.grid_rows == 0 || l.grid_cols == 0) return base + 1;
  const GridRegion r = unpad_region(l.grid_rows * side, l.grid_cols * side, l.height, l.width);
  return base + int64_t(r.height) * (r.width + 1);
}

int64_t image_rows(const ModelConfig& c, const ImageLayout& l) {
  if (!c.is_next()) return c.visual_tokens_per_image();
  // VisionZip packs each view's kept tokens without unpadding or newlines (its own NeXT packing).
  // A reducer whose tokens are off the patch grid (VisionZip) packs each view's tokens without
  // unpadding or newlines.
  if (!c.reducer.grid_side(c)) return int64_t(l.views()) * c.visual_tokens_per_image();
  return next_packed_rows(l, next_view_side(c));
}

int next_view_side(const ModelConfig& c) {
  return c.reducer.grid_side(c).value_or(c.vision.image_size / c.vision.patch_size);
}

ImageLayout image_layout(int width, int height, const ModelConfig& c) {
  if (width <= 0 || height <= 0)
    throw Error("image of " + std::to_string(width) + " x " + std::to_string(height) + " pixels is empty");
  ImageLayout l;
  l.height = height;
  l.width = width;
  if (!c.is_next()) return l;
  const auto& p = c.preprocess;
  const int S = c.vision.image_size;
  std::vector<Pinpoint> allowed;
  for (const Pinpoint& q : c.image_grid_pinpoints) {
    ImageLayout t = l;
    t.grid_rows = q[0] / S;
    t.grid_cols = q[1] / S;
    if (p.max_crops > 0 && t.grid_rows * t.grid_cols > p.max_crops) continue;
    if (p.max_image_tokens > 0 && image_rows(c, t) > p.max_image_tokens) continue;
    allowed.push_back(q);
  }
  if (!allowed.empty()) {
    const Pinpoint best = select_best_resolution(height, width, allowed);
    l.grid_rows = best[0] / S;
    l.grid_cols = best[1] / S;
  } else if (p.max_image_tokens > 0 && image_rows(c, l) > p.max_image_tokens) {
    throw Error("--max-image-tokens " + std::to_string(p.max_image_tokens) + " is below the " +
                std::to_string(image_rows(c, l)) + " rows of one image's base view alone");
  }
  return l;
}

}  // namespace victor
