"""Real 2-process DistributedDataParallel on gloo (CPU) with a tiny 4-bit Qwen2.5-VL + LoRA.

Two worker processes (this file run as a script, with the env `torchrun` would set) each take half of a batch of 4
conversations; after backward the LoRA gradients DDP all-reduced must equal the single-process gradients of the
whole batch, computed here in the test process from the same weights.

Loss reduction, so the comparison is exact: DDP *averages* gradients over ranks, and a per-rank token mean would
weight each rank's tokens by 1/(its own token count). So every rank (and the reference) passes
`num_items_in_batch = N`, the label-token count of the whole batch of 4, making the loss a token *sum* / N; each
rank multiplies its loss by the world size to undo DDP's average (what transformers' Trainer does with
`average_tokens_across_devices`). Then sum over ranks of grad(sum_r / N) == grad(sum_all / N) exactly, up to fp32
rounding (each half is padded to its own longest row, so matmul shapes differ from the reference's).

Also: only rank 0 writes through `save_on_main` / `on_main_process` / `main_process_only`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

NAME = "qwen2_5_vl"
N_SAMPLES = 4
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(folder: str):
    """Tiny 4-bit model + LoRA with deterministic non-zero adapter weights (peft's lora_B=0 would zero lora_A's grads)."""
    from hf_fastvision import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(folder, max_seq_length=256)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, use_gradient_checkpointing="unsloth")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model, processor


def _batches(processor):
    from hf_fastvision.archs.tiny import sample_messages
    from hf_fastvision.training import VisionSFTCollator

    samples = [{"messages": m} for m in sample_messages(NAME, N_SAMPLES)]
    collator = VisionSFTCollator(processor)
    full = collator(samples)
    n_items = int((full["labels"][:, 1:] != -100).sum())  # the causal-LM loss shifts labels by one
    half = N_SAMPLES // WORLD
    parts = [collator(samples[r * half:(r + 1) * half]) for r in range(WORLD)]
    assert sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts) == n_items
    return full, parts, n_items


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _worker(folder: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hf_fastvision.distributed import is_main_process, main_process_only, on_main_process, save_on_main, world_info
    from hf_fastvision.loading import default_device_map
    from hf_fastvision.training.saving import save_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    info = world_info()
    assert (info.rank, info.world_size) == (int(os.environ["RANK"]), WORLD)
    assert default_device_map(None) == "cpu"  # WORLD_SIZE=2 but no CUDA
    out_dir = Path(out)
    model, processor = _build(folder)
    _, parts, n_items = _batches(processor)
    ddp = DDP(model, find_unused_parameters=True)
    loss = ddp(**parts[info.rank], num_items_in_batch=n_items).loss * info.world_size
    loss.backward()
    torch.save(_lora_grads(ddp), out_dir / f"grads_rank{info.rank}.pt")

    save_on_main(save_adapter, ddp, out_dir / "adapter", processor)
    on_main_process(lambda: (out_dir / f"on_main_rank{info.rank}").write_text("x"))

    @main_process_only
    def mark() -> int:
        (out_dir / f"decorated_rank{info.rank}").write_text("x")
        return info.rank

    result = mark()
    # every rank sees the adapter after save_on_main's barrier
    seen = (out_dir / "adapter" / "adapter_config.json").exists()
    (out_dir / f"report_rank{info.rank}.json").write_text(
        json.dumps({"main": is_main_process(), "decorated_result": result, "adapter_seen": seen, "loss": float(loss)}))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_lora_grads_match_single_process_and_only_rank0_writes(tiny_checkpoint, tmp_path):
    folder = str(tiny_checkpoint(NAME))
    procs = _launch(folder, tmp_path, "ddp")

    # the single-process reference, while the workers run
    model, processor = _build(folder)
    full, _, n_items = _batches(processor)
    model(**full, num_items_in_batch=n_items).loss.backward()
    reference = _lora_grads(model)

    _wait(procs, 240)

    grads = [torch.load(tmp_path / f"grads_rank{r}.pt") for r in range(WORLD)]
    assert set(grads[0]) == set(reference) and len(reference) > 0
    assert any(float(g.abs().max()) > 0 for g in reference.values())
    for name, ref in reference.items():
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)  # all-reduced: identical
        torch.testing.assert_close(grads[0][name], ref, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # rank 0 wrote, rank 1 did not
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".adapter-*"))  # no leftover temporary folders
    assert sorted(p.name for p in tmp_path.glob("on_main_rank*")) == ["on_main_rank0"]
    assert sorted(p.name for p in tmp_path.glob("decorated_rank*")) == ["decorated_rank0"]
    reports = [json.loads((tmp_path / f"report_rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["main"] for r in reports] == [True, False]
    assert [r["decorated_result"] for r in reports] == [0, None]
    assert all(r["adapter_seen"] for r in reports)


def test_default_device_map_per_rank(monkeypatch):
    from hf_fastvision.loading import default_device_map

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device_map(None) == {"": 1}
    assert default_device_map("sequential") == {"": 1}
    assert default_device_map("auto") == "auto"  # an explicit map wins (model parallel across GPUs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device_map(None) == "cpu"


def test_world_info_and_main_process_from_env(monkeypatch, tmp_path):
    from hf_fastvision.distributed import is_main_process, on_main_process, save_on_main, world_info

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    info = world_info()
    assert (info.rank, info.local_rank, info.world_size, info.distributed) == (1, 1, 2, True)
    assert not is_main_process()
    assert on_main_process(lambda: 1) is None  # no process group: no barrier, just skipped
    assert save_on_main(lambda m, f: Path(f).write_text("x"), object(), tmp_path / "f") is None
    assert not (tmp_path / "f").exists()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    assert world_info() == type(info)(0, 0, 1) and is_main_process()
    assert on_main_process(lambda: 7) == 7


def test_fsdp_qlora_needs_quant_storage(tiny_checkpoint):
    import pytest

    from hf_fastvision import FastVisionModel
    from hf_fastvision.distributed import check_fsdp_qlora, fsdp_requested
    from hf_fastvision.errors import ConflictingOptionsError

    folder = str(tiny_checkpoint(NAME))
    model, _ = FastVisionModel.from_pretrained(folder)  # fp32 compute, uint8 storage
    with pytest.raises(ConflictingOptionsError, match=r'quant_storage="float32"'):
        check_fsdp_qlora(model)
    model, _ = FastVisionModel.from_pretrained(folder, quant_storage="float32")
    check_fsdp_qlora(FastVisionModel.get_peft_model(model, r=4))
    with pytest.raises(ConflictingOptionsError, match="bfloat16"):
        check_fsdp_qlora(model, compute_dtype=torch.bfloat16)
    assert not fsdp_requested()


def _fsdp_worker(folder: str, out: str) -> None:
    """FSDP (FULL_SHARD, peft's wrap policy) over a QLoRA model whose 4-bit weights are stored as fp32 (= compute)."""
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from hf_fastvision import FastVisionModel
    from hf_fastvision.distributed import check_fsdp_qlora, world_info

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = world_info().rank
    model, processor = FastVisionModel.from_pretrained(folder, max_seq_length=256, quant_storage="float32")
    model = FastVisionModel.get_peft_model(model, r=4, lora_dropout=0.0, use_gradient_checkpointing="unsloth")
    check_fsdp_qlora(model)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                   device_id=torch.device("cpu"), use_orig_params=False)
    local_bytes = sum(p.numel() * p.element_size() for p in wrapped.parameters())
    _, parts, n_items = _batches(processor)
    loss = wrapped(**parts[rank], num_items_in_batch=n_items).loss
    loss.backward()
    (Path(out) / f"fsdp_rank{rank}.json").write_text(json.dumps({"full": full_bytes, "local": local_bytes, "loss": float(loss)}))
    from hf_fastvision.distributed import save_on_main
    from hf_fastvision.training.saving import save_adapter, save_merged_16bit

    save_on_main(save_adapter, wrapped, Path(out) / "fsdp_adapter")  # all ranks gather, rank 0 writes
    try:
        save_on_main(save_merged_16bit, wrapped, Path(out) / "never")
    except ValueError as err:
        assert "save_adapter" in str(err)
    else:
        raise AssertionError("a merged save from a sharded model must be refused")
    dist.barrier()
    dist.destroy_process_group()


def _launch(folder: str, out: Path, mode: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        procs.append(subprocess.Popen([sys.executable, __file__, folder, str(out), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    t0 = time.time()
    for p in procs:
        try:
            log = p.communicate(timeout=max(10.0, timeout - (time.time() - t0)))[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, log[-4000:]


def test_fsdp_full_shard_qlora_on_gloo(tiny_checkpoint, tmp_path):
    """The 4-bit weights (fp32 storage here: the compute dtype on CPU) are sharded: each rank holds about half."""
    _wait(_launch(str(tiny_checkpoint(NAME)), tmp_path, "fsdp"), 240)
    reports = [json.loads((tmp_path / f"fsdp_rank{r}.json").read_text()) for r in range(WORLD)]
    full = reports[0]["full"]
    assert all(r["full"] == full for r in reports)
    assert all(r["local"] < 0.6 * full for r in reports)
    assert full <= sum(r["local"] for r in reports) <= full * 1.01  # + FSDP's padding to equal shards
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in reports)
    # the adapter rank 0 wrote from the gathered shards equals the unsharded model's LoRA weights (no step taken)
    from safetensors.torch import load_file

    from hf_fastvision import FastVisionModel

    saved = load_file(tmp_path / "fsdp_adapter" / "adapter_model.safetensors")
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint(NAME)), max_seq_length=256, quant_storage="float32")
    model = FastVisionModel.get_peft_model(model, r=4, lora_dropout=0.0, use_gradient_checkpointing="unsloth")
    expected = {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert saved.keys() == expected.keys() and saved
    for n, t in saved.items():
        torch.testing.assert_close(t.float(), expected[n].float(), msg=n)
    assert not (tmp_path / "never").exists()


def _graphed_worker(folder: str, out: str) -> None:
    """DDP over layers replayed as (emulated) CUDA graphs: three steps, so the third one replays."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hf_fastvision.training.checkpointing import _STATE_ATTR, enable_checkpointing

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, processor = _build(folder)
    enable_checkpointing(model.get_base_model(), "unsloth", cuda_graphs="emulate")
    _, parts, n_items = _batches(processor)
    ddp = DDP(model, find_unused_parameters=True)
    for _ in range(3):
        ddp.zero_grad(set_to_none=True)
        (ddp(**parts[rank], num_items_in_batch=n_items).loss * WORLD).backward()
    torch.save(_lora_grads(ddp), Path(out) / f"graphed_grads_rank{rank}.pt")
    layer = next(m for m in model.modules() if _STATE_ATTR in m.__dict__)
    stats = layer.__dict__[_STATE_ATTR].manager.graphs.stats
    (Path(out) / f"graphed_stats_rank{rank}.json").write_text(json.dumps(stats))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_with_graphed_layers_matches_single_process(tiny_checkpoint, tmp_path):
    folder = str(tiny_checkpoint(NAME))
    procs = _launch(folder, tmp_path, "graphed")
    model, processor = _build(folder)
    full, _, n_items = _batches(processor)
    model(**full, num_items_in_batch=n_items).loss.backward()
    reference = _lora_grads(model)
    _wait(procs, 240)
    for r in range(WORLD):
        stats = json.loads((tmp_path / f"graphed_stats_rank{r}.json").read_text())
        assert stats["replays"] > 0 and stats["failures"] == 0, stats
        grads = torch.load(tmp_path / f"graphed_grads_rank{r}.pt")
        assert set(grads) == set(reference)
        for name, ref in reference.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":  # a worker, started by the tests above
    workers = {"ddp": _worker, "fsdp": _fsdp_worker, "graphed": _graphed_worker}
    workers[sys.argv[3] if len(sys.argv) > 3 else "ddp"](sys.argv[1], sys.argv[2])
