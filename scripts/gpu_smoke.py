"""GPU smoke run of the load and training path (not a test): tiny and real-config models on CUDA.

Usage on the GPU machine: `python scripts/gpu_smoke.py --out $OUT`. Prints what it loaded, the plan, a few
QLoRA steps' losses and peak memory, for one named architecture built from its real config (random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--arch", default="qwen2_5_vl")
    args = parser.parse_args()
    from hf_fastvision import FastVisionModel, get_load_info
    from hf_fastvision.archs.tiny import sample_batch, tiny_model_and_processor

    assert torch.cuda.is_available(), "needs CUDA"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    folder = tempfile.mkdtemp()
    model, processor = tiny_model_and_processor(args.arch, seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    t0 = time.perf_counter()
    model, processor = FastVisionModel.from_pretrained(folder, max_seq_length=512)
    report["load_s"] = time.perf_counter() - t0
    info = get_load_info(model)
    report["dtype"] = info.dtype
    report["device_of_lm_head"] = str(model.lm_head.weight.device)
    report["plan"] = info.plan.summary()
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    batch = sample_batch(processor, args.arch, n=4).to("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    report["losses"] = losses
    report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(report, indent=2))
    with open(os.path.join(args.out, f"gpu_smoke_{args.arch}.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


if __name__ == "__main__":
    main()
