"""The vLLM engine: vLLM's `AsyncLLM` run inside the worker process.

engine.py    VllmEngine: start and close, generate and abort, driving AsyncLLM
mapping.py   llmq's params, outputs and settings in vLLM's terms, and back
adapters.py  LoRA adapters by name, each with the int id vLLM knows it by
"""
