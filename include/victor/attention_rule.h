// Which keys a query may see: the token kinds every row carries, Victor's register mask and the
// key-visibility rule, the one place it is written. No LibTorch: the KV cache (kv_cache.h) and
// the reducer table (reducer.h) both build on it, neither on the other.
#pragma once
#include <cstdint>

namespace victor {

enum class TokenKind : int64_t { Text = 0, Visual = 1, Register = 2, Pad = 3 };

// causal: every row sees every earlier row; registers_only: visual rows are seen only by their
// own image's visual rows and registers (text reads the image through the registers alone).
enum class RegisterMask { Causal, RegistersOnly };

// A query sees keys at or before its causal order, never padding; under registers_only a visual
// key only from its own image's visual rows and registers.
inline bool key_visible(int64_t q_order, int64_t q_kind, int64_t q_group, int64_t k_order, int64_t k_kind,
                        int64_t k_group, RegisterMask mode) {
  if (k_order > q_order || k_kind == int64_t(TokenKind::Pad)) return false;
  if (mode == RegisterMask::RegistersOnly && k_kind == int64_t(TokenKind::Visual))
    return (q_kind == int64_t(TokenKind::Visual) || q_kind == int64_t(TokenKind::Register)) && q_group == k_group;
  return true;
}

}  // namespace victor
