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

// C's roundf / lroundf: half away from zero.
static inline float round_half_away(float v) { return std::round(v); }

// C's float -> int conversion as x86 performs it: +-inf/NaN (only from 1/d overflowing on blocks of
// amax < ~1e-37) give INT_MIN, whose low bits are 0. C leaves this undefined; Felix fixes it to 0.
static inline int c_float_to_int(float v) { return std::isfinite(v) ? static_cast<int>(v) : 0; }

// ---------------------------------------------------------------------------------- Q8_0
static void quantize_block_q8_0(const float* x, uint8_t* y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_fp16(y, d);
    for (int j = 0; j < 32; ++j)
        y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(c_float_to_int(round_half_away(x[j] * id))));
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
    for (int j = 0; j < 16; ++j) {
        const int lo = std::min(15, c_float_to_int(x[j] * id + 8.5f));
        const int hi = std::min(15, c_float_to_int(x[j + 16] * id + 8.5f));
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
    if (x <= val[0]) return 0;
    if (x >= val[15]) return 15;
    int ml = 0, mu = 15;
    while (mu - ml > 1) {
        const int mav = (ml + mu) / 2;
        if (x < val[mav]) mu = mav; else ml = mav;
    }
    return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

static inline void iq4nl_sums(const float* x, const float* w, float id, const float* val,
                              float* sumqx, float* sumq2) {
    float sx = 0.0f, s2 = 0.0f;
    for (int j = 0; j < 32; ++j) {
        const float q = val[best_index(val, id * x[j])];
        sx += w[j] * q * x[j];
        s2 += w[j] * q * q;
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

static inline int nearest_code(const float* cb, float v) {  // strict `<`: first nearest wins
    int idx = 0;
    float best = 1e10f;
    for (int c = 0; c < 16; ++c) {
        const float dist = std::fabs(v - cb[c]);
        if (dist < best) { best = dist; idx = c; }
    }
    return idx;
}

static void quantize_block_rq4(const float* x, uint8_t* y, const float* cb) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / cb[15];
    store_fp16(y, d);
    const float inv_d = d > kRq4MinScale ? 1.0f / d : 0.0f;
    for (int j = 0; j < 16; ++j) {
        const int i0 = nearest_code(cb, x[2 * j] * inv_d);
        const int i1 = nearest_code(cb, x[2 * j + 1] * inv_d);
        y[2 + j] = static_cast<uint8_t>(i0 | (i1 << 4));
    }
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
    for (int j = 0; j < 256; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float id = amax != 0.0f ? 1.0f / amax : 0.0f;
    for (int c = 0; c < 2; ++c)
        for (int m = 0; m < 32; ++m) {
            uint8_t q = 0;
            for (int l = 0; l < 4; ++l) {
                const int xi = c_float_to_int(round_half_away(x[128 * c + 32 * l + m] * id)) + 1;
                q = static_cast<uint8_t>(q + ((xi & 3) << (2 * l)));
            }
            y[32 * c + m] = q;
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
