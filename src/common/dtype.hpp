// Storage dtypes and exact conversions between them and fp32 (round to nearest even).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace longtune {

enum class DType { F32, F16, BF16, F64, I32, I64, U8 };

size_t dtype_size(DType t);
// Safetensors spelling ("F32", "F16", "BF16", "F64", "I32", "I64", "U8").
std::string_view dtype_name(DType t);
// Parses a safetensors dtype name; returns false for names longtune does not handle.
bool parse_dtype(std::string_view name, DType* out);

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu))  // NaN stays a quiet NaN
    return uint16_t((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return uint16_t(bits >> 16);
}
float fp16_to_float(uint16_t h);
uint16_t float_to_fp16(float f);

// Converts n elements of `src` (dtype t) to fp32.
void convert_to_f32(float* dst, const void* src, DType t, size_t n);
// Converts n fp32 elements to dtype t (F32, F16, BF16 or F64).
void convert_from_f32(void* dst, const float* src, DType t, size_t n);

}  // namespace longtune
