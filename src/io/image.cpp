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
  // Rescaled in double and rounded once to float32, as transformers' rescale does.
  auto x = (hwc.to(torch::kFloat64) * p.rescale_factor).to(torch::kFloat32);  // [H,W,3]
  if (p.do_normalize) x = (x - mean) / std;
  return x.permute({2, 0, 1}).contiguous();
}

}  // namespace victor
