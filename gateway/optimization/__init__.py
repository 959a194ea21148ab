"""`/v1/optimization/jobs`: optimization jobs (quantization, pruning, precision, merged
LoRA) on the fine-tuning jobs' machinery."""
