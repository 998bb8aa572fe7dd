"""Stage 7, verify: does the shipped model keep what was trained: the RQ4 fidelity harness (fidelity) and the task
suite evaluation (task_eval). Imports the stages below it."""
