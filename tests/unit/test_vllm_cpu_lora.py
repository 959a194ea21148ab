"""vLLM's CPU LoRA ops once llmq's plugin (workers/engines/vllm/cpu_lora.py) has
run: a row with LoRA index -1 (a request without an adapter) gets nothing from
any adapter, in each of the six ops PunicaWrapperCPU calls, for shrink (which
overwrites its output) and expand with add_inputs true and false. Runs on the
real ops where vLLM is installed (.venv-vllm); test_engine_contract.py checks the
same end to end, on a mixed batch.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only; `make test-vllm` runs this module there")

from vllm.lora.ops import torch_ops
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.platforms import current_platform

from workers.engines.vllm import cpu_lora

NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
SLOTS, IN, OUT, SCALE = 2, 4, 3, 0.5
SEQ_LENS = [2, 1, 3]
SEQ_INDICES = [-1, 1, 0]  # per sequence; -1 is "no LoRA"
TOKEN_INDICES = [-1, -1, 1, 0, 0, 0]


@pytest.fixture
def ops(monkeypatch):
    """The six ops as punica_cpu calls them, after the plugin ran (undone after)."""
    if not current_platform.is_cpu():
        pytest.skip("the plugin patches vLLM's CPU platform only")
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in NAMES:
            monkeypatch.setattr(module, name, getattr(module, name))
    cpu_lora.register()
    cpu_lora.register()  # vLLM may load a plugin more than once
    return {name: getattr(punica_cpu, name) for name in NAMES}


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(SLOTS, 1, OUT, IN, generator=g)  # as vLLM stacks them
    inputs = torch.randn(len(TOKEN_INDICES), IN, generator=g)
    before = torch.randn(len(TOKEN_INDICES), OUT + 2, generator=g)
    return weights, inputs, before


def expected(weights, inputs, before, cols, *, scale=1.0, add):
    out = before.clone()
    for row, index in enumerate(TOKEN_INDICES):
        if index == -1:
            continue  # left as it was, as vLLM's GPU kernels leave it
        value = scale * (weights[index, 0] @ inputs[row])
        out[row, cols] = out[row, cols] + value if add else value
    return out


def sgmv_args():
    seq_lens = torch.tensor(SEQ_LENS)
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    return starts, seq_lens, torch.tensor(SEQ_INDICES), len(SEQ_LENS), max(SEQ_LENS), sum(SEQ_LENS)


def test_the_probe_tells_a_fixed_op_from_the_last_slot_bug():
    def fixed(inputs, weights, output, indices, scale):
        return None  # as the GPU kernels: -1 rows untouched

    assert not cpu_lora.mishandles_no_lora(fixed)
    assert not cpu_lora.mishandles_no_lora(cpu_lora.skip_no_lora_rows(lora_ops.bgmv_shrink))


def test_shrink_gives_rows_without_lora_nothing(ops):
    weights, inputs, before = case()
    want = expected(weights, inputs, before, slice(0, OUT), scale=SCALE, add=False)
    for name, extra in (("bgmv_shrink", (torch.tensor(TOKEN_INDICES),)), ("sgmv_shrink", sgmv_args())):
        out = before.clone()
        ops[name](inputs, weights, out, *extra, SCALE)
        torch.testing.assert_close(out, want, msg=name)


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("kind, seed, columns, slice_args", [("expand", 1, slice(0, OUT), ()),
                                                              ("expand_slice", 2, slice(1, 1 + OUT), (1, OUT))])
def test_expand_gives_rows_without_lora_nothing(ops, kind, seed, columns, slice_args, add_inputs):
    weights, inputs, before = case(seed)
    want = expected(weights, inputs, before, columns, add=add_inputs)
    for name, extra in ((f"bgmv_{kind}", (torch.tensor(TOKEN_INDICES),)), (f"sgmv_{kind}", sgmv_args())):
        out = before.clone()
        ops[name](inputs, weights, out, *extra, *slice_args, add_inputs)
        torch.testing.assert_close(out, want, msg=name)


def test_a_batch_without_lora_is_left_alone(ops):
    weights, inputs, before = case(3)
    out = before.clone()
    ops["bgmv_expand"](inputs, weights, out, torch.full((len(TOKEN_INDICES),), -1), True)
    ops["bgmv_shrink"](inputs, weights, out, torch.full((len(TOKEN_INDICES),), -1), SCALE)
    torch.testing.assert_close(out, before)
