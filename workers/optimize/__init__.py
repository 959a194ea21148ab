"""Optimization jobs on the trainer's side: the strategies applied to a loaded model
(strategies.py, with pruning.py and quantization.py), the short fine-tune that QAT
and pruning's recovery run (tune.py), the registry folder an optimized model is saved
as and that workers load it from (artifact.py), and one job's run (run.py)."""
