// One forward and backward entry point per SIMD level (kernels_<isa>.cpp).
#pragma once

#include "params.hpp"

namespace dattn::cpu {

void forward_scalar(const detail::DilatedParams& p);
void backward_scalar(const detail::DilatedParams& p);
void forward_avx2(const detail::DilatedParams& p);
void backward_avx2(const detail::DilatedParams& p);
void forward_avx512(const detail::DilatedParams& p);
void backward_avx512(const detail::DilatedParams& p);
// bfloat16 data only (see CpuIsa::avx512_bf16).
void forward_avx512_bf16(const detail::DilatedParams& p);
void backward_avx512_bf16(const detail::DilatedParams& p);
void forward_amx_bf16(const detail::DilatedParams& p);
void backward_amx_bf16(const detail::DilatedParams& p);

}  // namespace dattn::cpu
