"""Stage 0, core: facts every stage reads and nothing above it: the block-format table (formats), how files are
read and written (files: atomic writes, the one JSONL reader), the fork's arch and tensor names (fork), QUAIL's
defaults and whitelist (quail). Imports nothing from Felix outside felix.core."""
