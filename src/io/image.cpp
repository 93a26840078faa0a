#include "victor/image.h"

#include <cmath>

#include "stb_image.h"
#include "stb_image_write.h"
#include "victor/error.h"

namespace victor {

Image decode_image(const std::string& bytes, const std::string& source) {
  if (bytes.empty()) throw Error(source + ": empty file, not an image");
  int w = 0, h = 0, ch = 0;
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
  return !bytes.empty() &&
         stbi_info_from_memory(reinterpret_cast<const unsigned char*>(bytes.data()),
                               static_cast<int>(bytes.size()), width, height, &ch) != 0;
}

Image load_image(const std::string& path) { return decode_image(read_file(path), path); }

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

struct Taps {
  std::vector<int> start;
  std::vector<std::vector<double>> w;
};

// Filter taps as PIL computes them: the support widens by the scale when shrinking (antialias).
Taps make_taps(int in, int out) {
  Taps t;
  double scale = double(in) / out;
  double fscale = std::max(scale, 1.0);
  double support = 2.0 * fscale;
  for (int i = 0; i < out; ++i) {
    double center = (i + 0.5) * scale;
    int lo = std::max(int(center - support + 0.5), 0);
    int hi = std::min(int(center + support + 0.5), in);
    std::vector<double> w;
    double sum = 0;
    for (int j = lo; j < hi; ++j) {
      double v = cubic((j - center + 0.5) / fscale);
      w.push_back(v);
      sum += v;
    }
    if (sum != 0)
      for (auto& v : w) v /= sum;
    t.start.push_back(lo);
    t.w.push_back(std::move(w));
  }
  return t;
}

inline double clip255(double v) { return std::min(255.0, std::max(0.0, std::round(v))); }

}  // namespace

torch::Tensor resize_bicubic(const Image& img, int out_w, int out_h) {
  if (out_w <= 0 || out_h <= 0) throw Error("resize: output size must be positive");
  // Horizontal pass then vertical, rounding to 8 bits between passes as PIL does.
  std::vector<double> mid(size_t(img.height) * out_w * 3);
  if (out_w == img.width) {
    for (size_t i = 0; i < mid.size(); ++i) mid[i] = img.rgb[i];
  } else {
    Taps tx = make_taps(img.width, out_w);
    for (int y = 0; y < img.height; ++y)
      for (int x = 0; x < out_w; ++x)
        for (int c = 0; c < 3; ++c) {
          double acc = 0;
          for (size_t k = 0; k < tx.w[x].size(); ++k) acc += tx.w[x][k] * img.at(y, tx.start[x] + int(k), c);
          mid[(size_t(y) * out_w + x) * 3 + c] = clip255(acc);
        }
  }
  auto out = torch::empty({out_h, out_w, 3}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  if (out_h == img.height) {
    for (size_t i = 0; i < mid.size(); ++i) o[i] = float(mid[i]);
    return out;
  }
  Taps ty = make_taps(img.height, out_h);
  for (int y = 0; y < out_h; ++y)
    for (int x = 0; x < out_w; ++x)
      for (int c = 0; c < 3; ++c) {
        double acc = 0;
        for (size_t k = 0; k < ty.w[y].size(); ++k)
          acc += ty.w[y][k] * mid[(size_t(ty.start[y] + int(k)) * out_w + x) * 3 + c];
        o[(size_t(y) * out_w + x) * 3 + c] = float(clip255(acc));
      }
  return out;
}

namespace {

// The resize and center crop of preprocess_image for a width x height image: the size after
// resizing and the crop's corner. Shortest edge to `shortest_edge`, keeping the aspect ratio
// (Hugging Face's rule). box_in_input maps boxes through the same numbers.
struct ResizeCrop {
  int width, height, top, left;
};
ResizeCrop resize_crop(int width, int height, const PreprocessConfig& p) {
  const int short_side = std::min(width, height), long_side = std::max(width, height);
  const int new_long = int(double(p.shortest_edge) * long_side / short_side);
  ResizeCrop r;
  r.width = width <= height ? p.shortest_edge : new_long;
  r.height = width <= height ? new_long : p.shortest_edge;
  r.top = (r.height - p.crop_size) / 2;
  r.left = (r.width - p.crop_size) / 2;
  return r;
}

}  // namespace

torch::Tensor preprocess_image(const Image& input, const PreprocessConfig& p) {
  if (input.width <= 0 || input.height <= 0) throw Error("preprocess: empty image");
  Image img = input;
  if (p.pad_to_square) {
    uint8_t fill[3];
    for (int c = 0; c < 3; ++c) fill[c] = static_cast<uint8_t>(int(p.image_mean[c] * 255));
    img = pad_to_square(img, fill);
  }
  const ResizeCrop rc = resize_crop(img.width, img.height, p);
  torch::Tensor hwc = (rc.width == img.width && rc.height == img.height)
                          ? torch::from_blob(img.rgb.data(), {img.height, img.width, 3}, torch::kUInt8)
                                .to(torch::kFloat32)
                          : resize_bicubic(img, rc.width, rc.height);
  hwc = hwc.narrow(0, rc.top, p.crop_size).narrow(1, rc.left, p.crop_size);
  auto mean = torch::tensor(std::vector<float>(p.image_mean.begin(), p.image_mean.end()));
  auto std = torch::tensor(std::vector<float>(p.image_std.begin(), p.image_std.end()));
  auto x = (hwc * (1.0f / 255.0f) - mean) / std;  // [H,W,3]
  return x.permute({2, 0, 1}).contiguous();
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
