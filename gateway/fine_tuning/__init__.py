"""OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`) on the gateway, and serving a
published fine-tuned model by its name."""
