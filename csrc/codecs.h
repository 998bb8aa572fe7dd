// Felix CPU block codecs: ggml byte layouts, byte-exact with ggml's C reference quantizers.
//
// The block geometry below must equal felix/formats.py (the source of truth); a test compares the
// two through `felix._C.layouts()`. Codebooks are not compiled in: callers pass them from the Python
// format table, so there is exactly one copy of each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace felix {

enum class Format { Q8_0, Q4_0, IQ4_NL, RQ4, TQ2_0 };

struct Layout {
    const char* name;
    Format format;
    int ggml_type;
    int block_size;       // weights per block
    int bytes_per_block;  // scale included
    int scale_offset;     // byte offset of the fp16 scale
    int codebook_size;    // entries the caller must pass (0 = linear grid)
};

inline constexpr Layout kLayouts[] = {
    {"q8_0", Format::Q8_0, 8, 32, 34, 0, 0},
    {"q4_0", Format::Q4_0, 2, 32, 18, 0, 0},
    {"iq4_nl", Format::IQ4_NL, 20, 32, 18, 0, 16},
    {"rq4", Format::RQ4, 42, 32, 18, 0, 16},
    {"tq2_0", Format::TQ2_0, 35, 256, 66, 64, 0},
};

// Throws std::invalid_argument for an unknown name.
const Layout& layout_for(const std::string& name);

// Quantize n_blocks blocks of `src` (n_blocks * block_size floats) into `dst`
// (n_blocks * bytes_per_block bytes), in parallel over blocks with OpenMP.
void quantize(const Layout& layout, const float* src, uint8_t* dst, int64_t n_blocks, const float* codebook);

// Decode n_blocks blocks of `src` into n_blocks * block_size floats.
void dequantize(const Layout& layout, const uint8_t* src, float* dst, int64_t n_blocks, const float* codebook);

uint16_t fp32_to_fp16(float f);  // IEEE binary16, round to nearest even (as ggml's GGML_FP32_TO_FP16)
float fp16_to_fp32(uint16_t h);

}  // namespace felix
