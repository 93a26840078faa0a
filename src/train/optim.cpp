#include "victor/optim.h"

#include <cmath>

#include "victor/error.h"

namespace victor {

double warmup_cosine_lr(double lr, int step, int warmup, int total, double min_ratio) {
  if (step < warmup) return lr * double(step + 1) / double(warmup);
  const double progress = double(step - warmup) / double(std::max(1, total - warmup));
  const double floor = lr * min_ratio;
  return floor + 0.5 * (lr - floor) * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

AdamW::AdamW(std::vector<torch::Tensor> params, AdamWOptions o) : params_(std::move(params)), o_(o) {
  for (auto& p : params_) {
    m_.push_back(torch::zeros_like(p).detach());
    v_.push_back(torch::zeros_like(p).detach());
  }
}

void AdamW::step(const std::vector<torch::Tensor>& grads, double lr, double grad_scale, int64_t step) {
  if (grads.size() != params_.size()) throw Error("AdamW: one gradient per parameter");
  torch::NoGradGuard ng;
  const double bc1 = 1 - std::pow(o_.beta1, double(step + 1)), bc2 = 1 - std::pow(o_.beta2, double(step + 1));
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i];
    auto g = grads[i] * grad_scale;
    m_[i].mul_(o_.beta1).add_(g, 1 - o_.beta1);
    v_[i].mul_(o_.beta2).addcmul_(g, g, 1 - o_.beta2);
    auto denom = (v_[i] / bc2).sqrt_().add_(o_.eps);
    if (o_.weight_decay > 0 && p.dim() >= 2) p.mul_(1 - lr * o_.weight_decay);
    p.addcdiv_(m_[i], denom, -lr / bc1);
  }
}

double clip_scale(const std::vector<torch::Tensor>& grads, double max_norm, double* norm_out, int step) {
  double norm = 0;
  for (auto& g : grads) norm += g.pow(2).sum().item<double>();
  norm = std::sqrt(norm);
  if (!std::isfinite(norm)) throw Error("train: gradient is not finite at step " + std::to_string(step));
  if (norm_out) *norm_out = norm;
  return max_norm > 0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
}

}  // namespace victor
