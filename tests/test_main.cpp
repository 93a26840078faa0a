#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>

#include "victor/blas.h"

int main(int argc, char** argv) {
  victor::ensure_fast_blas(argv);
  ::testing::InitGoogleTest(&argc, argv);
  const char* env = std::getenv("OMP_NUM_THREADS");
  at::set_num_threads(env && std::atoi(env) > 0 ? std::atoi(env) : 2);
  return RUN_ALL_TESTS();
}
