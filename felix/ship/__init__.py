"""Stage 6, ship: a trained checkpoint to the runtimes: GGUF export (export), gguf-py's writer and reader with RQ4
(gguf_file), llama.cpp and the fork through llama-cpp-python (llamacpp), the OpenAI-compatible server (serve,
serve_child). Imports the stages below it."""
