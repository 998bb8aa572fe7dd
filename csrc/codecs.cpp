// Felix CPU block codecs. Each quantizer follows ggml's C reference operation for operation in
// float32 (build with -ffp-contract=off: a fused multiply-add would change the bytes), so the output
// equals ggml's bytes; see felix/reference/codecs.py for the spec and the tie-breaking rules.
#include "codecs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace felix {

const Layout& layout_for(const std::string& name) {
    for (const Layout& l : kLayouts)
        if (name == l.name) return l;
    throw std::invalid_argument("unknown quantization format '" + name + "'");
}

// ------------------------------------------------------------------------------ fp16 helpers
static inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

uint16_t fp32_to_fp16(float f) {
    const uint32_t x = bits_of(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t absx = x & 0x7FFFFFFFu;
    if (absx >= 0x7F800000u)                       // inf or nan
        return static_cast<uint16_t>(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
    if (absx >= 0x477FF000u)                       // rounds to >= 65520: overflow to inf
        return static_cast<uint16_t>(sign | 0x7C00u);
    if (absx < 0x38800000u) {                      // below the fp16 normal range: subnormal or 0
        // Adding 0.5 (2^-1) aligns the fp16 subnormal step 2^-24 with float's last mantissa bit,
        // so the float addition itself rounds to nearest even.
        const float r = float_of(absx) + 0.5f;
        return static_cast<uint16_t>(sign | (bits_of(r) - 0x3F000000u));
    }
    // Normal: drop 13 mantissa bits with round-to-nearest-even, re-bias the exponent.
    const uint32_t odd = (absx >> 13) & 1u;
    const uint32_t rounded = absx + 0xFFFu + odd;
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {                                       // subnormal: man * 2^-24
        const float v = static_cast<float>(man) * float_of(0x33800000u);
        return sign ? -v : v;
    }
    return float_of(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline void store_fp16(uint8_t* p, float f) {
    const uint16_t h = fp32_to_fp16(f);
    p[0] = static_cast<uint8_t>(h & 0xFF);
    p[1] = static_cast<uint8_t>(h >> 8);
}

static inline float load_fp16(const uint8_t* p) {
    return fp16_to_fp32(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

// ggml converts +-inf/NaN to integers when 1/d overflows (blocks of amax < ~1e-37). C leaves that
// undefined; x86 yields INT_MIN, whose low bits are 0, and Felix fixes that result on every backend.
// The quantizers below detect the overflow once per block (std::isinf(id)) and write those zeros.

// ggml's MAX(amax, fabsf(v)) (inputs are validated finite; a plain compare, unlike std::fmax, vectorizes)
static inline float abs_max(float amax, float v) {
    const float a = std::fabs(v);
    return a > amax ? a : amax;
}

// lroundf for values known finite and small (|v| < 2^31): branch-free, so block loops vectorize.
static inline int lround_finite(float v) {
    const int t = static_cast<int>(v);
    const float frac = v - static_cast<float>(t);
    return t + (frac >= 0.5f) - (frac <= -0.5f);
}

// ---------------------------------------------------------------------------------- Q8_0
static void quantize_block_q8_0(const float* x, uint8_t* y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = abs_max(amax, x[j]);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_fp16(y, d);
    if (std::isinf(id)) {  // 1/d overflowed: every x*id is +-inf or NaN, which x86 converts to 0
        std::memset(y + 2, 0, 32);
        return;
    }
    int8_t q[32];
    for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(lround_finite(x[j] * id));
    std::memcpy(y + 2, q, 32);
}

static void dequantize_block_q8_0(const uint8_t* y, float* x) {
    const float d = load_fp16(y);
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(static_cast<int8_t>(y[2 + j])) * d;
}

// ---------------------------------------------------------------------------------- Q4_0
// First element of largest |x| (strict `>` from +0, as ggml).
static inline float first_absmax(const float* x, int n, float* amax_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float ax = std::fabs(x[j]);
        if (ax > amax) { amax = ax; max = x[j]; }
    }
    *amax_out = amax;
    return max;
}

static void quantize_block_q4_0(const float* x, uint8_t* y) {
    float amax;
    const float max = first_absmax(x, 32, &amax);
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_fp16(y, d);
    const bool overflow = std::isinf(id);  // then every x*id + 8.5 is +-inf or NaN: x86 converts to 0
    for (int j = 0; j < 16; ++j) {
        const int lo = overflow ? 0 : std::min(15, static_cast<int>(x[j] * id + 8.5f));
        const int hi = overflow ? 0 : std::min(15, static_cast<int>(x[j + 16] * id + 8.5f));
        y[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
}

static void dequantize_block_q4_0(const uint8_t* y, float* x) {
    const float d = load_fp16(y);
    for (int j = 0; j < 16; ++j) {
        x[j] = static_cast<float>((y[2 + j] & 0xF) - 8) * d;
        x[j + 16] = static_cast<float>((y[2 + j] >> 4) - 8) * d;
    }
}

// -------------------------------------------------------------------------------- IQ4_NL
// ggml's quantize_row_iq4_nl_impl for one 32-weight block, no importance matrix, ntry = 7.
static constexpr int kIq4nlTries = 7;
static constexpr float kGroupMaxEps = 1e-15f;

static inline int best_index(const float* val, float x) {  // ggml's best_index_int8 over 16 values
    // ggml binary-searches for the ml with val[ml] <= x < val[ml+1]; on a sorted grid that ml is the
    // number of val[1..14] <= x. Counting is branch-free, so the callers' loops vectorize.
    int ml = 0;
    for (int k = 1; k < 15; ++k) ml += val[k] <= x;
    const int nearest = x - val[ml] < val[ml + 1] - x ? ml : ml + 1;
    return x <= val[0] ? 0 : (x >= val[15] ? 15 : nearest);
}

static inline void iq4nl_sums(const float* x, const float* w, float id, const float* val,
                              float* sumqx, float* sumq2) {
    float q[32];
    for (int j = 0; j < 32; ++j) q[j] = val[best_index(val, id * x[j])];  // independent: vectorizes
    float sx = 0.0f, s2 = 0.0f;
    for (int j = 0; j < 32; ++j) {  // sequential float32 sums, in ggml's order
        sx += w[j] * q[j] * x[j];
        s2 += w[j] * q[j] * q[j];
    }
    *sumqx = sx;
    *sumq2 = s2;
}

static void quantize_block_iq4_nl(const float* x, uint8_t* y, const float* val) {
    float w[32];
    for (int j = 0; j < 32; ++j) w[j] = x[j] * x[j];
    float amax;
    const float max = first_absmax(x, 32, &amax);
    float scale = 0.0f;
    if (amax >= kGroupMaxEps) {
        float d = -max / val[0];
        float sumqx, sumq2;
        iq4nl_sums(x, w, 1.0f / d, val, &sumqx, &sumq2);
        d = sumqx / sumq2;
        float best = d * sumqx;
        for (int itry = -kIq4nlTries; itry <= kIq4nlTries; ++itry) {
            const float id = (static_cast<float>(itry) + val[0]) / max;
            iq4nl_sums(x, w, id, val, &sumqx, &sumq2);
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scale = d;
    }
    store_fp16(y, scale);
    const float id = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int j = 0; j < 16; ++j) {
        const int lo = best_index(val, id * x[j]);
        const int hi = best_index(val, id * x[j + 16]);
        y[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
}

static void dequantize_block_iq4_nl(const uint8_t* y, float* x, const float* val) {
    const float d = load_fp16(y);
    for (int j = 0; j < 16; ++j) {
        x[j] = d * val[y[2 + j] & 0xF];
        x[j + 16] = d * val[y[2 + j] >> 4];
    }
}

// ----------------------------------------------------------------------------------- RQ4
static constexpr float kRq4MinScale = 1e-10f;

static void quantize_block_rq4(const float* x, uint8_t* y, const float* cb) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = abs_max(amax, x[j]);
    const float d = amax / cb[15];
    store_fp16(y, d);
    const float inv_d = d > kRq4MinScale ? 1.0f / d : 0.0f;
    // The fork scans all 16 entries keeping the first strict minimum of |v - cb[c]|. On a sorted
    // codebook whose gaps (>= 0.0099) dwarf float32 rounding at |v| <= 0.25, the rounded distances
    // fall strictly before the insertion point k and rise strictly after it, so the scan's answer is
    // k-1 unless cb[k] is strictly closer: the same index, branch-free.
    float v[32];
    int k[32], idx[32];
    for (int j = 0; j < 32; ++j) { v[j] = x[j] * inv_d; k[j] = 0; }
    for (int c = 0; c < 16; ++c)
        for (int j = 0; j < 32; ++j) k[j] += cb[c] < v[j];
    for (int j = 0; j < 32; ++j) {
        const int lo = k[j] > 0 ? k[j] - 1 : 0, hi = k[j] < 16 ? k[j] : 15;
        idx[j] = std::fabs(v[j] - cb[hi]) < std::fabs(v[j] - cb[lo]) ? hi : lo;
    }
    for (int j = 0; j < 16; ++j) y[2 + j] = static_cast<uint8_t>(idx[2 * j] | (idx[2 * j + 1] << 4));
}

static void dequantize_block_rq4(const uint8_t* y, float* x, const float* cb) {
    const float d = load_fp16(y);
    for (int j = 0; j < 16; ++j) {
        x[2 * j] = cb[y[2 + j] & 0xF] * d;
        x[2 * j + 1] = cb[y[2 + j] >> 4] * d;
    }
}

// --------------------------------------------------------------------------------- TQ2_0
// 256 weights: byte 32c+m, bits 2l..2l+1 hold element 128c+32l+m as q in {0,1,2}; fp16 d last.
static void quantize_block_tq2_0(const float* x, uint8_t* y) {
    float amax = 0.0f;
    for (int j = 0; j < 256; ++j) amax = abs_max(amax, x[j]);
    const float id = amax != 0.0f ? 1.0f / amax : 0.0f;
    const bool overflow = std::isinf(id);  // x*id is +-inf / NaN: x86 converts to 0, so q = 1
    for (int c = 0; c < 2; ++c)
        for (int m = 0; m < 32; ++m) {
            int q = 0;
            for (int l = 0; l < 4; ++l) {
                const int xi = (overflow ? 0 : lround_finite(x[128 * c + 32 * l + m] * id)) + 1;
                q += (xi & 3) << (2 * l);
            }
            y[32 * c + m] = static_cast<uint8_t>(q);
        }
    store_fp16(y + 64, amax);
}

static void dequantize_block_tq2_0(const uint8_t* y, float* x) {
    const float d = load_fp16(y + 64);
    for (int c = 0; c < 2; ++c)
        for (int l = 0; l < 4; ++l)
            for (int m = 0; m < 32; ++m)
                x[128 * c + 32 * l + m] = static_cast<float>(((y[32 * c + m] >> (2 * l)) & 3) - 1) * d;
}

// ------------------------------------------------------------------------------ dispatch
void quantize(const Layout& L, const float* src, uint8_t* dst, int64_t n_blocks, const float* cb) {
    const int bs = L.block_size, bb = L.bytes_per_block;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n_blocks; ++i) {
        const float* x = src + i * bs;
        uint8_t* y = dst + i * bb;
        switch (L.format) {
            case Format::Q8_0: quantize_block_q8_0(x, y); break;
            case Format::Q4_0: quantize_block_q4_0(x, y); break;
            case Format::IQ4_NL: quantize_block_iq4_nl(x, y, cb); break;
            case Format::RQ4: quantize_block_rq4(x, y, cb); break;
            case Format::TQ2_0: quantize_block_tq2_0(x, y); break;
        }
    }
}

void dequantize(const Layout& L, const uint8_t* src, float* dst, int64_t n_blocks, const float* cb) {
    const int bs = L.block_size, bb = L.bytes_per_block;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n_blocks; ++i) {
        const uint8_t* y = src + i * bb;
        float* x = dst + i * bs;
        switch (L.format) {
            case Format::Q8_0: dequantize_block_q8_0(y, x); break;
            case Format::Q4_0: dequantize_block_q4_0(y, x); break;
            case Format::IQ4_NL: dequantize_block_iq4_nl(y, x, cb); break;
            case Format::RQ4: dequantize_block_rq4(y, x, cb); break;
            case Format::TQ2_0: dequantize_block_tq2_0(y, x); break;
        }
    }
}

}  // namespace felix
