// Storage types the kernels read, and the one dtype-dispatch helper.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fidelity_kld/check.h"

namespace fk {

// LLAMA_U16 is one row of a llama.cpp --kl-divergence-base file: a float32 scale and a
// float32 min_log_prob (8 bytes), then `vocab` uint16 codes; value = scale * u + min_log_prob.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, LLAMA_U16 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::LLAMA_U16: return "llama_u16";
  }
  return "unknown";
}

// Bytes per vocabulary entry.
inline int64_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

// Bytes before the first vocabulary entry of a row.
inline int64_t dtype_row_header(DType d) { return d == DType::LLAMA_U16 ? 8 : 0; }

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

// Calls fn(DTypeTag<D>{}) for the runtime dtype d.
template <class Fn>
decltype(auto) dispatch_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::F32: return fn(DTypeTag<DType::F32>{});
    case DType::F16: return fn(DTypeTag<DType::F16>{});
    case DType::BF16: return fn(DTypeTag<DType::BF16>{});
    case DType::LLAMA_U16: return fn(DTypeTag<DType::LLAMA_U16>{});
  }
  FK_CHECK(false, "unknown dtype code " << static_cast<int>(d));
}

// Portable scalar conversions (used for tails, labels and the scalar path).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++shift;
    }
    mant &= 0x3ffu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Per-row decoding state: for LLAMA_U16 the row's scale and minimum, unused otherwise.
struct RowDecode {
  float scale = 1.0f;
  float offset = 0.0f;
};

template <DType D>
inline RowDecode read_row_header(const uint8_t* row) {
  RowDecode dec;
  if constexpr (D == DType::LLAMA_U16) {
    std::memcpy(&dec.scale, row, 4);
    std::memcpy(&dec.offset, row + 4, 4);
  }
  return dec;
}

// Element i of a row whose entries start at `values`.
template <DType D>
inline float load_scalar(const uint8_t* values, int64_t i, const RowDecode& dec) {
  if constexpr (D == DType::F32) {
    float f;
    std::memcpy(&f, values + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, values + 2 * i, 2);
    if constexpr (D == DType::F16) return half_to_float(h);
    if constexpr (D == DType::BF16) return bf16_to_float(h);
    if constexpr (D == DType::LLAMA_U16) return dec.scale * static_cast<float>(h) + dec.offset;
  }
}

}  // namespace fk
