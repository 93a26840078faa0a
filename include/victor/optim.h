// The optimizer and learning-rate schedule both trainers use (train and train-vision): AdamW with
// decoupled weight decay, and a linear warm-up into a cosine decay to a floor.
#pragma once
#include <torch/torch.h>

#include <vector>

namespace victor {

// lr * (step + 1) / warmup during the warm-up, then a cosine from lr to lr * min_ratio over the
// remaining steps (held at the floor past `total`).
double warmup_cosine_lr(double lr, int step, int warmup, int total, double min_ratio);

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;  // decoupled; applied to matrices only (dim >= 2), not norms or biases
};

// AdamW over a fixed list of parameters; its moments are plain tensors (checkpoints save and
// restore them by parameter).
class AdamW {
 public:
  AdamW(std::vector<torch::Tensor> params, AdamWOptions o);
  // One update from gradients scaled by `grad_scale` (clipping), with bias correction for the
  // update numbered `step` (0-based).
  void step(const std::vector<torch::Tensor>& grads, double lr, double grad_scale, int64_t step);
  std::vector<torch::Tensor>& exp_avg() { return m_; }
  std::vector<torch::Tensor>& exp_avg_sq() { return v_; }
  const std::vector<torch::Tensor>& exp_avg() const { return m_; }
  const std::vector<torch::Tensor>& exp_avg_sq() const { return v_; }

 private:
  std::vector<torch::Tensor> params_, m_, v_;
  AdamWOptions o_;
};

// Scale that clips the gradients' global L2 norm to `max_norm` (1 when within it or max_norm <= 0);
// `norm` receives the norm. Throws when it is not finite.
double clip_scale(const std::vector<torch::Tensor>& grads, double max_norm, double* norm, int step);

}  // namespace victor
