"""Stage 1, ops: each op as a torch.library custom op over a float64 spec and a torch reference (reference/),
with its backends: Triton kernels (felix.ops.kernels, the repository's kernels/ folder), the C++ CPU codecs and the
HIP matmul (_ext, _gpu_ext); backend dispatch (dispatch), the per-tensor GGUF type policy and tensor codecs
(quant_policy), ggml's activation rounding (activation_rounding), `felix selftest` (selftest) and the AOT compile
check (aot). Imports felix.core only."""
