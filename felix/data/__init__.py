"""Stage 4, data: what a model is trained on: the built-in corpus, user files and token streams (corpus), pretraining
sources read as document streams (sources), token shards and their manifest (shards), weighted mixes (mix), the
tokenizer trained on a corpus sample (tokenizer_training) and teacher data for distillation (teachers).
Imports felix.core, felix.ops, felix.model and felix.tasks."""
