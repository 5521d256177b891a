"""A pushed repo loads with stock transformers alone (a subprocess that never imports hf_fastvision)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoProcessor

from hf_fastvision.quantize import sample_inputs
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from huggingface_hub import metadata_load
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo_id, cache, inputs_path, out_path = sys.argv[1:5]
    model = AutoModelForImageTextToText.from_pretrained(repo_id, revision="main", cache_dir=cache)
    processor = AutoProcessor.from_pretrained(repo_id, revision="main", cache_dir=cache)
    inputs = torch.load(inputs_path)
    with torch.no_grad():  # fresh allocations, as hf_fastvision.quantize.stable_logits does
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and type(p).__name__ != "Params4bit":
                    p.data = p.data.clone()
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()
            if getattr(module, "support_avx512bf16_for_cpu", False):  # bitsandbytes' dequantize route, as ours
                module.support_avx512bf16_for_cpu = False
        logits = model(**inputs).logits.float()
    torch.save(logits, out_path)
    from huggingface_hub import try_to_load_from_cache
    readme = try_to_load_from_cache(repo_id, "README.md", cache_dir=cache, revision="main")
    print(json.dumps({
        "class": type(model).__name__,
        "module": type(model).__module__,
        "linear4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
        "processor": type(processor).__name__,
        "card": metadata_load(readme),
        "imported_hf_fastvision": any(m.split(".")[0] == "hf_fastvision" for m in sys.modules),
    }))
    """
)


def test_pushed_repo_loads_with_stock_transformers(qwen_roundtrip, tmp_path):
    QWEN_REPO, QWEN_BASE = qwen_roundtrip["repo_id"], qwen_roundtrip["base_model"]
    processor = AutoProcessor.from_pretrained(qwen_roundtrip["pulled"]["path"])
    inputs = dict(sample_inputs(processor))
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, QWEN_REPO, str(qwen_roundtrip["cache"]), str(tmp_path / "inputs.pt"),
         str(tmp_path / "logits.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported_hf_fastvision"] is False
    assert result["class"] == "Qwen2VLForConditionalGeneration" and result["module"].startswith("transformers.")
    assert result["linear4bit"] > 0
    card = result["card"]
    assert card["base_model"] == QWEN_BASE and card["base_model_relation"] == "quantized"
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "image-text-to-text"
    assert {"bitsandbytes", "4-bit", "hf_fastvision", "qwen2_vl"} <= set(card["tags"])
    assert torch.equal(torch.load(tmp_path / "logits.pt"), torch.load(qwen_roundtrip["logits"]))
