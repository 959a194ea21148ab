"""The torch engine: a transformers causal LM run by llmq's own continuous-batching scheduler.

engine.py        TorchEngine: start and close, generate and abort, the scheduler thread's loop
scheduler.py     which waiting requests join the running batch, and which leave on abort
row.py           one request's state: its tokens, its text so far, the outputs it sends
batch.py         the running batch: its rows in generations, each left-padded with its own mask
kv_cache.py      each generation's KV cache, written in place
sampling.py      each row's next token: greedy, or temperature, top-k, top-p
model_runner.py  the model on its device: loading, int8, one forward pass per step
attention.py     the attention function a step runs: each generation over its own columns, prompts causally
adapters.py      PEFT LoRA adapters, loaded on first use
"""
