// LLaVA-1.5 image preprocessing into tensors (the torch-free steps are in image_io.cpp).
#include "victor/image.h"

#include "victor/error.h"

namespace victor {

torch::Tensor resize_bicubic(const Image& img, int out_w, int out_h) {
  if (out_w <= 0 || out_h <= 0) throw Error("resize: output size must be positive");
  auto out = torch::empty({out_h, out_w, 3}, torch::kFloat32);
  resize_bicubic_into(img, out_w, out_h, out.data_ptr<float>());
  return out;
}

namespace {
// [H,W,3] floats in 0..255 -> [3,H,W]: rescaled in double and rounded once to float32, as
// transformers' rescale does, then normalized in float32.
torch::Tensor rescale_normalize(const torch::Tensor& hwc, const PreprocessConfig& p) {
  auto mean = torch::tensor(std::vector<float>(p.image_mean.begin(), p.image_mean.end()));
  auto std = torch::tensor(std::vector<float>(p.image_std.begin(), p.image_std.end()));
  auto x = (hwc.to(torch::kFloat64) * p.rescale_factor).to(torch::kFloat32);
  if (p.do_normalize) x = (x - mean) / std;
  return x.permute({2, 0, 1}).contiguous();
}

torch::Tensor as_float_hwc(const Image& img) {
  return torch::from_blob(const_cast<uint8_t*>(img.rgb.data()), {img.height, img.width, 3}, torch::kUInt8)
      .to(torch::kFloat32);
}
}  // namespace

PreparedImage prepare_image(const Image& img, const ModelConfig& c) {
  if (img.width <= 0 || img.height <= 0) throw Error("preprocess: empty image");
  PreparedImage out;
  out.layout = image_layout(img.width, img.height, c);
  if (!c.is_next()) {
    out.pixels = preprocess_image(img, c.preprocess).unsqueeze(0);
    return out;
  }
  const PreprocessConfig& p = c.preprocess;
  const int S = p.crop_size, E = p.shortest_edge;
  std::vector<torch::Tensor> views;
  // The base view: resized (not cropped) to E x E; the processor's own resize and crop that follow
  // leave an E x E view as it is (E == S, checked by validate).
  views.push_back(rescale_normalize(
      (img.width == E && img.height == E) ? as_float_hwc(img) : resize_bicubic(img, E, E), p));
  const ImageLayout& l = out.layout;
  if (l.grid_rows > 0) {
    const Pinpoint best{l.grid_rows * S, l.grid_cols * S};
    const auto [nh, nw] = patch_output_size(img.height, img.width, best);
    torch::Tensor resized = (nw == img.width && nh == img.height) ? as_float_hwc(img) : resize_bicubic(img, nw, nh);
    auto canvas = torch::zeros({best[0], best[1], 3}, torch::kFloat32);
    const int top = (best[0] - nh) / 2, left = (best[1] - nw) / 2;
    canvas.narrow(0, top, nh).narrow(1, left, nw).copy_(resized);
    for (int r = 0; r < l.grid_rows; ++r)
      for (int q = 0; q < l.grid_cols; ++q)
        views.push_back(rescale_normalize(canvas.narrow(0, r * S, S).narrow(1, q * S, S), p));
  }
  out.pixels = torch::stack(views, 0);
  return out;
}

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
  return rescale_normalize(hwc, p);
}

}  // namespace victor
