"""`hf-fastvision demo`: fine-tune the embedded tiny vision-language model on a synthetic visual task.

The embedded model (`hf_fastvision/assets/tiny_vlm`, made by `scripts/make_embedded_model.py`) is loaded in 4-bit
through `FastVisionModel`, given LoRA adapters on its vision and language layers, and taught to name the colour
of a shape drawn with PIL at a random place and size. Accuracy on held-out images is measured before and after
training by ranking the candidate answers by likelihood (chance = 1 / number of colours); the adapter is then
saved, reloaded onto a fresh 4-bit base and asked about a new image.
"""

from __future__ import annotations

import numbers
import random
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from hf_fastvision.errors import InvalidArgumentError

__all__ = ["COLOURS", "make_example", "embedded_model_path", "evaluate", "train", "run_demo"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 170),
    "orange": (240, 140, 20),
}
QUESTION = "what color is the shape?"
IMAGE_SIZE = 56


def embedded_model_path() -> Path:
    path = Path(str(resources.files("hf_fastvision").joinpath("assets/tiny_vlm")))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Embedded model missing at {path}; run `python scripts/make_embedded_model.py`.")
    return path


def make_example(rng: random.Random) -> tuple[Image.Image, str]:
    """A grey canvas with one filled shape of a random colour, position and size; returns (image, colour)."""
    colour = rng.choice(sorted(COLOURS))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    size = rng.randint(IMAGE_SIZE // 2, IMAGE_SIZE * 3 // 4)
    x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    box = (x, y, x + size, y + size)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLOURS[colour])
    return img, colour


def conversation(image: Image.Image, answer: str | None = None) -> list[dict[str, Any]]:
    conv: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}
    ]
    if answer is not None:
        conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return conv


@torch.no_grad()
def evaluate(model: Any, processor: Any, examples: list[tuple[Image.Image, str]]) -> float:
    """Fraction of examples whose true colour is the most likely answer among all colours."""
    from hf_fastvision.training.collator import VisionSFTCollator

    collator = VisionSFTCollator(processor)
    was_training = model.training
    model.eval()
    correct = 0
    names = sorted(COLOURS)
    for image, colour in examples:
        batch = collator([{"messages": conversation(image, name)} for name in names])
        batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != -100
        scores = (logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
        correct += int(names[int(scores.argmax())] == colour)
    model.train(was_training)
    return correct / len(examples)


def train(model: Any, processor: Any, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True) -> list[float]:
    from tqdm.auto import tqdm

    from hf_fastvision.training.collator import VisionSFTCollator

    rng = random.Random(seed)
    collator = VisionSFTCollator(processor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="fine-tuning", disable=not progress)
    for _ in bar:
        samples = [make_example(rng) for _ in range(batch_size)]
        batch = collator([{"messages": conversation(img, colour)} for img, colour in samples])
        batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _positive(name: str, value: Any, default: int) -> int:
    """`value`, or `default` when None; anything but a positive int is refused before the model loads."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise InvalidArgumentError.positive_int(name, value, default)
    return int(value)


def run_demo(
    steps: int | None = None,
    seed: int = 0,
    output_dir: str | None = None,
    quick: bool = False,
    eval_size: int | None = None,
) -> dict[str, Any]:
    """The README's main job: prints accuracy before and after, and returns what it measured."""
    from peft import PeftModel

    from hf_fastvision import FastVisionModel
    from hf_fastvision.training.saving import save_adapter

    steps = _positive("steps", steps, 100 if quick else 200)
    eval_size = _positive("eval_size", eval_size, 24 if quick else 60)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidArgumentError.non_negative_int("seed", seed, 0)
    if output_dir is not None and Path(output_dir).is_file():
        raise InvalidArgumentError.not_a_folder("output_dir", str(output_dir))
    torch.manual_seed(seed)
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"hf_fastvision demo on {device}: teach a tiny 4-bit vision-language model to name colours")
    path = embedded_model_path()
    model, processor = FastVisionModel.from_pretrained(str(path), max_seq_length=256)
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=32, random_state=seed)
    held_out = [make_example(random.Random(10_000 + seed * 1_000 + i)) for i in range(eval_size)]
    before = evaluate(model, processor, held_out)
    print(f"accuracy before fine-tuning: {before:.0%} (chance {1 / len(COLOURS):.0%}) on {eval_size} held-out images")
    t0 = time.perf_counter()
    losses = train(model, processor, steps=steps, batch_size=8, lr=1e-2, seed=seed)
    after = evaluate(model, processor, held_out)
    print(f"accuracy after {steps} steps ({time.perf_counter() - t0:.0f} s, loss {losses[0]:.2f} → {losses[-1]:.2f}): {after:.0%}")

    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="hf_fastvision_demo_"))
    save_adapter(model, out / "adapter")  # through the safe writer: the user's files in output_dir are kept
    print(f"adapter saved to {out / 'adapter'}")
    base, processor2 = FastVisionModel.from_pretrained(str(path), max_seq_length=256)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    FastVisionModel.for_inference(reloaded)
    image, colour = make_example(random.Random(999_999 + seed))
    inputs = processor2.apply_chat_template(
        conversation(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(reloaded.device)
    generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor2.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    print(f"reloaded adapter, new {colour} shape: Q: {QUESTION}  A: {answer}")
    reloaded_acc = evaluate(reloaded, processor2, held_out[: max(6, eval_size // 4)])
    print(f"reloaded adapter accuracy on {max(6, eval_size // 4)} held-out images: {reloaded_acc:.0%}")
    return {"before": before, "after": after, "answer": answer, "colour": colour, "reloaded": reloaded_acc}
