"""Stage 8, tools: live edits through the splice tensors (edit) and structured pruning (prune). Imports the stages
below it."""
