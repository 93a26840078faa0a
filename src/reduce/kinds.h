// The built-in rows of the reducer table, one file each (none, victor, pool, fastv, visionzip,
// resampler). reducer.cpp puts them in the table before anything else is registered.
#pragma once
#include <vector>

#include "victor/reducer.h"

namespace victor {

ReducerKindEntry none_reducer_kind();
ReducerKindEntry victor_reducer_kind();
ReducerKindEntry pool_reducer_kind();
ReducerKindEntry fastv_reducer_kind();
ReducerKindEntry visionzip_reducer_kind();
ReducerKindEntry resampler_reducer_kind();

inline std::vector<ReducerKindEntry> builtin_reducer_kinds() {
  return {none_reducer_kind(),      victor_reducer_kind(),     pool_reducer_kind(),
          fastv_reducer_kind(),     visionzip_reducer_kind(),  resampler_reducer_kind()};
}

// Learned rows (registers, latents) are allocated as [count, hidden]: bounded as the --registers
// flag is, so a spec cannot ask for gigabytes before a shape check sees it.
constexpr int kMaxLearnedRows = 4096;
constexpr int kBigSpecInt = 1 << 20;

}  // namespace victor
