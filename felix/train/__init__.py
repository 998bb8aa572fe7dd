"""Stage 5, train: one training loop (loop: WSD + QUAIL pretraining, SFT, QAT, spokes-only and SODA distillation
as its modes), its run config (config), the run directory (runs: lock, checkpoints, trainer state), a run's data
on shards (run_data), torchrun (distributed) and the distillation objectives (distill).
Imports the stages below it (core, ops, model, tasks, data)."""
