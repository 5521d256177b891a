"""scripts/memory_peak.py's replay of allocator events (the GPU run itself happens on the GPU machine)."""

from __future__ import annotations

def _frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


def test_peak_composition_finds_the_peak_and_what_is_alive_then(script_module):
    mp = script_module("memory_peak")
    ours = [_frame("/x/site-packages/torch/nn/functional.py", 10, "linear"),
            _frame("/work/main/hf_fastvision/kernels/lora_linear_4bit.py", 52, "_forward")]
    hf = [_frame("/x/site-packages/transformers/models/mllama/modeling_mllama.py", 190, "forward")]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 50, "frames": hf},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 70, "frames": hf},   # 120 live: below the first peak of 150
        {"action": "alloc", "addr": 4, "size": 60, "frames": ours},  # 180 live: the peak
        {"action": "free_requested", "addr": 4, "size": 60},
        {"action": "segment_alloc", "addr": 9, "size": 10_000},      # segments are reserved, not allocated
        {"action": "free_requested", "addr": 77, "size": 5},         # a block from before the trace: ignored
    ]
    peak, at, groups, alive = mp.peak_composition(events)
    assert (peak, at) == (180, 4)
    assert groups == {"hf_fastvision/kernels/lora_linear_4bit.py:52:_forward": [60, 1],
                      "transformers/models/mllama/modeling_mllama.py:190:forward": [120, 2]}
    assert sorted(e["addr"] for e in alive) == [2, 3, 4]
    # who allocated a site's live blocks: the frames of ours / transformers / peft / autograd, innermost first
    (size, blocks, frames), = mp.common_stacks(alive, "hf_fastvision/kernels/lora_linear_4bit.py:52:_forward")
    assert (size, blocks, frames) == (60, 1, ["hf_fastvision/kernels/lora_linear_4bit.py:52:_forward"])


def test_site_falls_back_to_the_innermost_frame(script_module):
    mp = script_module("memory_peak")
    assert mp.site_of([_frame("/usr/lib/python3/threading.py", 5, "run")]) == "threading.py:5:run"
    assert mp.site_of([]) == "?"


def test_saved_by_names_the_autograd_nodes_that_keep_a_tensor(script_module):
    import torch

    mp = script_module("memory_peak")
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    kept = x * 2  # saved by the matmul below (w needs a gradient, so its other operand is kept)
    loss = (kept @ w).sum()
    holders = mp.saved_by(loss.grad_fn, kept.untyped_storage().data_ptr())
    assert holders and all(h.startswith("MmBackward") for h in holders), holders
    assert mp.saved_by(loss.grad_fn, torch.randn(2).untyped_storage().data_ptr()) == []


def test_reserved_is_summed_per_pool_and_stream(script_module):
    mp = script_module("memory_peak")
    blocks = [{"size": 40, "state": "inactive"}, {"size": 60, "state": "active_allocated"}]
    segments = [
        {"segment_pool_id": (0, 0), "stream": 0, "total_size": 100, "allocated_size": 60, "blocks": blocks},
        {"segment_pool_id": (1, 2), "total_size": 300, "allocated_size": 0,   # a graph pool between replays
         "blocks": [{"size": 300, "state": "inactive"}]},
        {"segment_pool_id": (0, 0), "stream": 0, "total_size": 50, "allocated_size": 50},
        {"total_size": 10, "allocated_size": 10},                              # no pool id: the default pool
        {"segment_pool_id": (0, 0), "stream": 77, "total_size": 20, "allocated_size": 0,  # the side stream's cache
         "blocks": [{"size": 12, "state": "inactive"}, {"size": 8, "state": "inactive"}]},
    ]
    assert mp.reserved_by_pool(segments) == [
        {"pool": "(1, 2)", "stream": 0, "reserved": 300, "allocated": 0, "segments": 1, "largest_free": 300},
        {"pool": "(0, 0)", "stream": 0, "reserved": 160, "allocated": 120, "segments": 3, "largest_free": 40},
        {"pool": "(0, 0)", "stream": 77, "reserved": 20, "allocated": 0, "segments": 1, "largest_free": 12},
    ]
