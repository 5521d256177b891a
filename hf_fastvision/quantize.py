"""`hf-fastvision quantize`: a 16-bit vision-language model → a verified bitsandbytes 4-bit repo.

Pipeline (`quantize_and_publish`), each stage on a progress bar:

1. check the destination first (repo id, existing repo holding another base model; or the local folder);
2. load SOURCE in 16-bit and record its logits on a bundled image + prompt (`sample_image`, `PROMPT`);
3. quantize with the architecture's plan (nf4/fp4, double quant, modules kept 16-bit) by loading SOURCE through
   `AutoFastVisionModel` with `load_in_4bit=True` (bitsandbytes quantizes each weight as it loads);
4. save to a temporary folder, reload *that folder* and require logits identical to the in-memory 4-bit model;
   report the error against the 16-bit logits;
5. copy the processor files, render the model card, then publish the folder in ONE commit (`hub.push_folder`)
   or move it into `--local-dir` with an atomic rename. A failure at any stage leaves no half-written folder.

`--dry-run` prints the plan from the config alone (no weights are loaded).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_fastvision.errors import ConflictingOptionsError, FastVisionError
from hf_fastvision.writer import SafeWriter

__all__ = [
    "PROMPT",
    "sample_image",
    "sample_inputs",
    "logit_error",
    "realign",
    "stable_logits",
    "plan_quantization",
    "quantize_and_publish",
    "quantize_command",
    "main",
    "QuantizeResult",
    "VerificationError",
]

PROMPT = "Describe this image in one sentence."
DTYPES = ("bfloat16", "float16", "float32")
_QUANTIZED_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "README.md")
STAGES = ("load 16-bit", "reference logits", "quantize", "save", "reload + verify", "card", "publish")


class VerificationError(FastVisionError, RuntimeError):
    """The checkpoint written to disk does not reproduce the in-memory 4-bit model."""


# --------------------------------------------------------------------------------------------------- inputs
def sample_image(size: int = 96) -> Any:
    """The bundled test image: a colour gradient with a disc and a bar, computed in integers (the same everywhere)."""
    from PIL import Image

    pixels = []
    c, r2 = size // 2, (size // 4) ** 2
    for y in range(size):
        for x in range(size):
            if (x - c) ** 2 + (y - c) ** 2 <= r2:
                pixels.append((230, 40, 40))
            elif size // 8 <= y < size // 5:
                pixels.append((30, 30, 200))
            else:
                pixels.append((255 * x // (size - 1), 255 * y // (size - 1), 127 * (x + y) // (size - 1)))
    image = Image.new("RGB", (size, size))
    image.putdata(pixels)
    return image


def sample_inputs(processor: Any, image: Any = None, prompt: str = PROMPT) -> Any:
    """Processor output for one image + prompt, through the chat template where the processor has one."""
    image = image if image is not None else sample_image()
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        batch = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    else:
        token = getattr(processor, "image_token", None) or "<image>"
        batch = processor(text=f"{token}{prompt}", images=[image], return_tensors="pt")
    batch.pop("labels", None)
    return batch


def realign(model: Any) -> Any:
    """Give every 16-bit parameter and buffer of `model` a fresh (64-byte aligned) allocation.

    CPU matmul kernels round differently depending on a weight's memory alignment, and a model quantized in
    memory and the same model loaded from disk (memory-mapped safetensors) place their 16-bit weights at
    different offsets. Realigned, two models with bit-identical tensors give bit-identical logits. The packed
    4-bit weights are left alone (dequantization is exact). Returns `model`.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and type(param).__name__ != "Params4bit" and param.device.type != "meta":
                    param.data = param.data.clone()
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.clone()
    return model


def stable_logits(model: Any, inputs: Any) -> Any:
    """Logits (float32, on the CPU) of `model` on `inputs`, after `realign` and on bitsandbytes' dequantize route
    (`quantization.keep_canonical_packing`): comparable bit for bit."""
    import torch

    from hf_fastvision.patching import unpatched
    from hf_fastvision.quantization import keep_canonical_packing

    realign(model)
    keep_canonical_packing(model)  # a model loaded by stock transformers would take bitsandbytes' CPU GEMV route
    with torch.no_grad(), unpatched(model):  # checkpoint identity, not kernel rounding, is what is compared
        return model(**inputs.to(model.device)).logits.float().cpu()


def _logits(model: Any, inputs: Any, *, exact: bool = True) -> Any:
    if exact:
        return stable_logits(model, inputs)
    import torch

    with torch.no_grad():  # the 16-bit reference is compared with a tolerance: no need to realign (copy) it
        return model(**inputs.to(model.device)).logits.float().cpu()


def logit_error(quantized: Any, reference: Any, attention_mask: Any = None) -> dict[str, Any]:
    """Error of `quantized` logits against `reference` logits over the attended positions."""
    q, r = quantized.float(), reference.float()
    if attention_mask is not None:
        keep = attention_mask.bool().to(q.device)
        q, r = q[keep], r[keep]
    q, r = q.reshape(-1, q.shape[-1]), r.reshape(-1, r.shape[-1])
    diff = q - r
    return {
        "max_abs": float(diff.abs().max()),
        "mean_abs": float(diff.abs().mean()),
        "relative": float(diff.norm() / r.norm().clamp_min(1e-12)),
        "top1_agreement": float((q.argmax(-1) == r.argmax(-1)).float().mean()),
        "positions": int(q.shape[0]),
        "vocab": int(q.shape[-1]),
    }


# --------------------------------------------------------------------------------------------------- plan
def _load_kwargs(token: str | None, revision: str | None) -> dict[str, Any]:
    return {k: v for k, v in (("token", token), ("revision", revision)) if v is not None}


def plan_quantization(
    source: str,
    *,
    source_revision: str | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    keep: Sequence[str] = (),
    keep_vision_16bit: bool = False,
    compute_dtype: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """What `quantize_and_publish` would do to `source`, from its config alone (no weights are loaded)."""
    from hf_fastvision.auto import FAST_VISION_MAPPING
    from hf_fastvision.checkpoint_info import _plain_module
    from hf_fastvision.loading import (
        LoadOptions,
        _prequantized,
        arch_for,
        default_dtype,
        load_config,
        plan_for,
        resolve_for,
    )
    from hf_fastvision.quantization import estimate_memory, meta_model

    extra = _load_kwargs(token, source_revision)
    resolution = resolve_for(source, LoadOptions(bits=16, extra=extra))
    config = load_config(resolution, extra)
    spec = arch_for(config, source)
    if _prequantized(config):
        raise ConflictingOptionsError(
            ["SOURCE", f"a pre-quantized checkpoint ({resolution.name})"],
            "quantize starts from 16-bit weights; pass the 16-bit model instead.",
        )
    dtype = default_dtype(compute_dtype)
    model_class = FAST_VISION_MAPPING[type(config)]
    options = LoadOptions(bits=4, quant_type=quant_type, double_quant=double_quant,
                          keep_vision_16bit=keep_vision_16bit, keep_modules=tuple(keep))
    plan = plan_for(config, spec, model_class, options, dtype)
    meta = meta_model(config, model_class)
    size_16bit = 2 * sum(p.numel() for p in meta.parameters())
    size_4bit = int(estimate_memory(meta, plan)["total_gib"] * 1024**3)
    return {
        "source": source,
        "resolved": resolution.name,
        "resolution": resolution.reason,
        "arch": spec.name,
        "model_type": config.model_type,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "plan": plan.summary(),
        "kept_modules": [_plain_module(s) for s in plan.skip_modules],
        "quantized_linear": len(plan.quantized),
        "kept_linear": len(plan.kept),
        "size_16bit": size_16bit,
        "size_4bit_estimate": size_4bit,
    }


# --------------------------------------------------------------------------------------------------- pipeline
@dataclass
class QuantizeResult:
    """What `quantize_and_publish` did. `logits` holds the 4-bit model's logits on `sample_inputs`."""

    source: str
    repo_id: str | None
    revision: str | None
    folder: str | None
    commit: Any
    plan: dict[str, Any]
    checkpoint: Any
    size_16bit: int
    logit_error: dict[str, Any]
    reload_identical: bool
    logits: Any = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "folder": self.folder,
            "commit": str(self.commit) if self.commit is not None else None,
            "plan": self.plan,
            "size_16bit": self.size_16bit,
            "size_4bit": self.checkpoint.weight_bytes if self.checkpoint is not None else None,
            "logit_error": self.logit_error,
            "reload_identical": self.reload_identical,
        }


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quantize_and_publish(
    source: str,
    repo_id: str | None = None,
    *,
    local_dir: str | os.PathLike[str] | None = None,
    source_revision: str | None = None,
    revision: str | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    keep: Sequence[str] = (),
    keep_vision_16bit: bool = False,
    compute_dtype: str | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> QuantizeResult:
    """Quantize `source` to bitsandbytes 4-bit, verify the written checkpoint, then publish it.

    With `local_dir` the verified folder is moved there (atomically) and nothing is pushed; otherwise it is pushed
    to `repo_id` in one commit (`hub.push_folder`). `repo_id` also names the model in the card's usage snippets.
    """
    from tqdm.auto import tqdm

    from hf_fastvision import hub
    from hf_fastvision.auto import AutoFastVisionModel
    from hf_fastvision.loading import get_load_info

    if repo_id is None and local_dir is None:
        raise ValueError("Give a repo id to push to, or local_dir= to write the folder without pushing.")
    if repo_id is not None:
        hub.validate_repo_id(repo_id)
    # --local-dir goes through the safe writer: protected places and clashes with the user's files are refused now
    writer = (SafeWriter(local_dir, kind="quantized_4bit", overwrite=force, expected=_QUANTIZED_FILES)
              if local_dir is not None else None)
    dest = writer.dest if writer is not None else None
    plan_info = plan_quantization(source, source_revision=source_revision, quant_type=quant_type,
                                  double_quant=double_quant, keep=keep, keep_vision_16bit=keep_vision_16bit,
                                  compute_dtype=compute_dtype, token=token)
    resolved = plan_info["resolved"]
    is_local = Path(resolved).is_dir()
    base = base_model or (None if is_local else resolved)
    if dest is None:  # refuse a bad destination before any weight is loaded
        hub.check_destination(repo_id, revision=revision, base_model=base, model_type=plan_info["model_type"],
                              token=token, force=force)

    bar = tqdm(total=len(STAGES), desc="quantize", unit="stage", disable=not progress)
    tmp: Path | None = None

    def stage(name: str) -> None:
        bar.set_postfix_str(name)

    stack = ExitStack()
    try:
        stage(STAGES[0])
        load = dict(dtype=plan_info["compute_dtype"], **_load_kwargs(token, source_revision))
        model16 = AutoFastVisionModel.from_pretrained(source, load_in_16bit=True, **load)
        resolution = get_load_info(model16).resolution
        src_dir = hub.source_files_dir(resolution.name, resolution.revision, token=token)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(src_dir))
        inputs = sample_inputs(processor)
        bar.update()

        stage(STAGES[1])
        reference = _logits(model16, inputs, exact=False)
        size_16bit = hub._size_16bit(model16)
        del model16
        _free()
        bar.update()

        stage(STAGES[2])
        load4 = dict(dtype=plan_info["compute_dtype"], **_load_kwargs(token, resolution.revision))
        model4 = AutoFastVisionModel.from_pretrained(
            resolution.name, load_in_4bit=True, quant_type=quant_type, double_quant=double_quant,
            keep_modules=tuple(keep), keep_vision_16bit=keep_vision_16bit, use_exact_model_name=True, **load4,
        )
        plan = get_load_info(model4).plan
        logits = _logits(model4, inputs)
        error = logit_error(logits, reference, inputs.get("attention_mask"))
        bar.update()

        stage(STAGES[3])
        name = dest.name if dest is not None else "quantized"
        if writer is not None:
            tmp = stack.enter_context(writer).tmp
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-"))
        model4.save_pretrained(tmp, max_shard_size=max_shard_size)
        hub.copy_source_files(src_dir, tmp)
        del model4
        _free()
        bar.update()

        stage(STAGES[4])
        reloaded = AutoFastVisionModel.from_pretrained(str(tmp), dtype=plan_info["compute_dtype"])
        again = _logits(reloaded, inputs)
        del reloaded
        _free()
        if not (again.shape == logits.shape and bool((again == logits).all())):
            raise VerificationError(
                f"The saved checkpoint does not reproduce the 4-bit model (max logit difference "
                f"{float((again - logits).abs().max()) if again.shape == logits.shape else 'shape mismatch'}); "
                "nothing was published. Report this with the transformers and bitsandbytes versions."
            )
        checkpoint = hub.inspect_checkpoint(tmp)
        bar.update()

        stage(STAGES[5])
        context = hub.card_context(
            checkpoint, repo_id=repo_id or name, base_model=base, size_16bit=size_16bit, logit_error=error,
            source_card=hub._front_matter(src_dir / "README.md"), kept_linear=len(plan.kept),
        )
        (tmp / "README.md").write_text(hub.render_card(context), encoding="utf-8")
        hub._check_files_for_secrets(tmp, hub._secrets(token), redact=True)
        bar.update()

        stage(STAGES[6])
        commit = None
        if writer is not None:
            stack.close()  # publishes the verified folder (atomic replace of an earlier save)
            folder, tmp = str(dest), None
        else:
            assert repo_id is not None
            commit = hub.push_folder(tmp, repo_id, revision=revision, private=private, token=token,
                                     commit_message=commit_message, create_pr=create_pr, force=force, base_model=base)
            folder = None
        bar.update()
        checkpoint = hub.inspect_checkpoint(folder) if folder else checkpoint
        return QuantizeResult(source=source, repo_id=repo_id, revision=revision, folder=folder, commit=commit,
                              plan=plan.summary(), checkpoint=checkpoint, size_16bit=size_16bit, logit_error=error,
                              reload_identical=True, logits=logits)
    except BaseException:
        stack.__exit__(*sys.exc_info())  # the writer discards its temporary folder; nothing is published
        raise
    finally:
        bar.close()
        if tmp is not None and writer is None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- command
def argparse_type(check: Any) -> Any:
    """An argparse `type=` from a check raising one of our errors: argparse prints the message and exits 2."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except FastVisionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__
    return convert


def _module_pattern(text: str) -> str:
    """`--keep`: a regex that compiles (kept as text; the plan compiles it again)."""
    import re

    from hf_fastvision.errors import InvalidArgumentError

    try:
        re.compile(text)
    except re.error as exc:
        raise InvalidArgumentError.bad_regex("--keep", text, str(exc)) from None
    return text


def _shard_size(text: str) -> int | str:
    """`--max-shard-size`: a positive number of bytes, or a size with a KB/MB/GB/TB unit (e.g. "500MB")."""
    import re

    from hf_fastvision.errors import InvalidArgumentError

    value = text.strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]B)", value, flags=re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise InvalidArgumentError.shard_size(text)
    return f"{m.group(1)}{m.group(2).upper()}"


def _hub_id(text: str) -> str:
    """`--base-model`: a repo id the Hub accepts."""
    from hf_fastvision.hub import validate_repo_id

    return validate_repo_id(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-fastvision quantize",
        description="Quantize a 16-bit vision-language model to bitsandbytes 4-bit, verify the written checkpoint "
        "against the in-memory model, and publish it with a model card in one commit. The token comes from "
        "HF_TOKEN or `hf auth login` (never from the command line).",
    )
    p.add_argument("source", help="16-bit model: Hub id or local folder")
    p.add_argument("repo_id", nargs="?", help="Hub repo to publish to (e.g. you/Model-bnb-4bit)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="quantize without double quant")
    p.add_argument("--keep", action="append", default=[], metavar="MODULE_PATTERN", type=argparse_type(_module_pattern),
                   help="regex of module paths to keep in 16-bit (repeatable)")
    p.add_argument("--keep-vision-16bit", action="store_true", help="keep the whole vision tower in 16-bit")
    p.add_argument("--compute-dtype", choices=DTYPES, default=None,
                   help="compute / 16-bit dtype (default: bfloat16 on GPUs that support it, float16 on other GPUs, "
                   "float32 on CPU)")
    p.add_argument("--source-revision", default=None, help="revision of SOURCE to load")
    p.add_argument("--revision", default=None, help="branch to publish to (created if missing; default main)")
    p.add_argument("--base-model", default=None, type=argparse_type(_hub_id),
                   help="Hub id of the 16-bit model, for the card (default: SOURCE if it is a Hub id)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--max-shard-size", default="5GB", type=argparse_type(_shard_size),
                   help="largest weight file: bytes, or a size with a unit (KB, MB, GB, TB), e.g. 500MB (default 5GB)")
    p.add_argument("--local-dir", default=None, metavar="DIR", help="write the verified folder to DIR instead of pushing")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no weights are loaded)")
    p.add_argument("--force", action="store_true",
                   help="publish over a repo holding a different base model / replace a non-empty --local-dir")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _gb(n: int | None) -> str:
    from hf_fastvision.checkpoint_info import human_bytes as _human

    return _human(n)


def _print_plan(plan: dict[str, Any], args: argparse.Namespace) -> None:
    dest = f"local folder {args.local_dir}" if args.local_dir else f"{args.repo_id}@{args.revision or 'main'}"
    print(f"source        {plan['source']} -> {plan['resolved']} ({plan['resolution']})")
    print(f"architecture  {plan['arch']} ({plan['model_type']}), compute dtype {plan['compute_dtype']}")
    q = plan["plan"]
    print(f"quantization  bitsandbytes 4-bit {q['quant_type']}{' + double quant' if q['double_quant'] else ''}")
    print(f"linear layers {plan['quantized_linear']} quantized, {plan['kept_linear']} kept in 16-bit")
    for module in plan["kept_modules"]:
        print(f"  kept 16-bit {module}")
    for role, counts in q.get("by_role", {}).items():
        print(f"  {role:<10} {counts['quantized']} quantized, {counts['kept_16bit']} kept")
    print(f"weights       {_gb(plan['size_16bit'])} in 16-bit -> about {_gb(plan['size_4bit_estimate'])} in 4-bit")
    print(f"destination   {dest}")


def quantize_command(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hf-fastvision quantize` and `scripts/quantize_and_push.py`; returns the exit status."""
    from hf_fastvision import hub

    parser = _parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.repo_id is not None:
            hub.validate_repo_id(args.repo_id)
        if args.repo_id is None and args.local_dir is None and not args.dry_run:
            parser.error("give REPO_ID to publish to, or --local-dir DIR to write the folder without pushing")
        common = dict(source_revision=args.source_revision, quant_type=args.quant_type, double_quant=args.double_quant,
                      keep=args.keep, keep_vision_16bit=args.keep_vision_16bit, compute_dtype=args.compute_dtype)
        if args.dry_run:
            plan = plan_quantization(args.source, **common)
            if args.json:
                print(json.dumps(plan, indent=2))
            else:
                _print_plan(plan, args)
            return 0
        result = quantize_and_publish(
            args.source, args.repo_id, local_dir=args.local_dir, revision=args.revision, base_model=args.base_model,
            private=args.private, commit_message=args.commit_message, create_pr=args.create_pr, force=args.force,
            max_shard_size=args.max_shard_size, progress=args.progress, **common,
        )
    except FastVisionError as exc:
        print(f"error: {hub.scrub(str(exc), hub._secrets())}", file=sys.stderr)
        return 1
    summary = result.as_dict()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    e = result.logit_error
    print(f"quantized     {result.source}: {_gb(result.size_16bit)} -> {_gb(summary['size_4bit'])}")
    print(f"logit error   max {e['max_abs']:.4g}, mean {e['mean_abs']:.4g}, relative {e['relative']:.4g}, "
          f"top-1 agreement {100 * e['top1_agreement']:.1f}% (vs 16-bit)")
    print("verified      reloaded checkpoint gives identical logits")
    print(f"published     {result.commit}" if result.commit is not None else f"written       {result.folder}")
    return 0


def main() -> None:
    raise SystemExit(quantize_command())


if __name__ == "__main__":
    main()
