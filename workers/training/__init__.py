"""The trainer: runs fine-tuning jobs (LoRA, (IA)^3 adapters or full fine-tunes) on
the base model with transformers' Trainer, resumable from checkpoints on shared
storage, and publishes what passes the quality gate to the registry."""
