"""Stage 2, model: Felix-LM v2 in one file (felix_lm: config, presets, the transformer, checkpoints), its SpliceCore
splices (splice) and the fork's spokes (spokes), 4-bit linears (quant_linear), quantization-aware training's
fake-quant (qat), the tokenizer (tokenizer), the chat format (chat) and the one greedy decoder (generate).
Imports felix.core and felix.ops."""
