"""One 4-bit QLoRA training step on a tiny saved checkpoint: what the patch-exactness tests compare."""

from __future__ import annotations

from typing import Any


def lora_step(folder: str, name: str, patches: Any = None, dtype: Any = None, autocast: Any = None,
              configure: Any = None, after_lora: Any = None,
              lora: dict | None = None, samples: int = 2) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``folder`` (a tiny ``name`` checkpoint) in 4-bit with ``patches``, open its zero gates, add LoRA on
    vision and language layers with every ``lora_B`` set to seeded non-zero values (so every gradient is
    exercised), run one forward + backward on ``sample_batch`` of ``samples`` conversations (under ``autocast``, a
    torch dtype, when given) and return ``(model, loss, {name: grad})``. ``configure(model)``, when given, runs on
    the loaded model before LoRA is added, ``after_lora(model)`` on the LoRA model before the step; ``lora`` adds
    `get_peft_model` arguments (e.g. ``finetune_mlp_modules=False``)."""
    import torch

    from hf_fastvision import FastVisionModel
    from hf_fastvision.archs.tiny import open_zero_gates, sample_batch, tiny_processor

    model, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=dtype or torch.bfloat16,
                                               patches=patches)
    open_zero_gates(model)
    if configure is not None:
        configure(model)
    torch.manual_seed(0)
    model = FastVisionModel.get_peft_model(model, **{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                                     "finetune_vision_layers": True, "random_state": 0, **(lora or {})})
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    if after_lora is not None:
        after_lora(model)
    model.train()
    batch = sample_batch(tiny_processor(name), name, n=samples)
    if autocast is not None:
        with torch.autocast("cpu", dtype=autocast):
            loss = model(**batch).loss
    else:
        loss = model(**batch).loss
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
