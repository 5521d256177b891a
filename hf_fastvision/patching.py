"""Instance patches: fused kernels bound onto one loaded model's modules, driven by its `ArchSpec`.

Nothing in transformers is touched: each patch replaces `forward` on a module *instance* (keeping the original
in `_hffv_original_forward`), so two models in one process can be patched differently and `unpatch` restores
the stock behaviour exactly. Patching twice is a no-op. Architectures whose spec lists no patches (the generic
path) are left as they are.

- `rms_norm`: every `*RMSNorm` module under the vision/language roots → the fused RMSNorm kernel (Gemma's
  `x·(1+w)` in fp32 where the spec says "gemma").
- `mlp`: gated MLPs (`gate_proj`/`up_proj`/`down_proj` with SiLU or tanh-GELU) → one fused SwiGLU/GeGLU op.
- `vision_mlp`: where the spec names one (Mllama), the vision MLP runs in the autocast dtype without the fp32
  round trips 4-bit linears cause (bit-identical; `archs/_mllama_vision_mlp.py`).
- `vision_states`: where the spec names one (Mllama), the vision encoders keep only the layer outputs the model
  reads later instead of all of them (`archs/_mllama_vision_encoder.py`; the same values, ~1 GiB less at the peak),
  and in training the model frees the vision output once it is projected (`archs/_mllama_model.py`).
- `cross_attention_split`: Mllama's text cross-attention as a flash varlen call over the keys each row can see,
  where the mask has the one-image form (`archs/_mllama_cross_attention.py`); any other form runs stock.
- `vision_attention_split`: Mllama's vision attention as an exact maskless split (one flash varlen call).
- `mlp_lean_recompute`: in checkpointed layers the spec lists (``patches["lean_mlp"]``), the gated MLP
  saves only its input, skips its forward in the recompute and recomputes gate/up in token chunks in its backward
  (`training/lean_mlp.py`).
- `rope`: where the spec asks for it, each text attention module whose forward calls its modeling module's
  `apply_rotary_pos_emb` runs that same forward (transformers' own code, through its decorators) with the name
  resolved to the fused RoPE kernel (`kernels/rope.py`): one pass over q and k each way instead of eager's
  multiplies, negation and concatenation. Only the copy bound on this instance sees the kernel; the modeling module's
  globals are read once, at patch time.
- `vision_attention`: the spec's own forward for its vision attention modules (Qwen-VL: chunks of equal length
  in one SDPA call instead of one call per window; with `rope` on, its rotary through the fused kernel too).
- `fused_loss`: with `labels`, the top model's forward runs with `logits_to_keep=1` and the loss is computed
  from the final hidden states by the chunked linear + cross-entropy, so full `[tokens, vocab]` logits are never
  materialised. The returned `logits` then hold the last position only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from hf_fastvision import allocator
from hf_fastvision.registry import ArchSpec, get_arch, resolve_roots

logger = logging.getLogger(__name__)

__all__ = [
    "PatchOptions",
    "apply_patches",
    "unpatch",
    "unpatched",
    "patched_modules",
    "suspend_patches",
    "resume_patches",
    "patches_active",
    "apply_lora_patches",
    "original_forward",
]

_ORIGINAL = "_hffv_original_forward"
_KIND = "_hffv_patch"
_SUSPENDED = "_hffv_suspended_forward"


@dataclass(frozen=True)
class PatchOptions:
    """Which kernels to bind; each can be turned off on its own (`from_pretrained(..., patches={...})`)."""

    rms_norm: bool = True
    """Fused RMSNorm (forward and backward in one kernel each)."""
    rope: bool = True
    """The text attention's rotary embedding through the fused RoPE kernel (transformers' attention forward, with
    its `apply_rotary_pos_emb` resolved to `kernels.rope.apply_rotary_pos_emb`), and the Qwen-VL towers' (the
    spec's vision-attention forward, `kernels.rope.apply_rotary_pos_emb_vision`). H200: Llama-3.2-11B-Vision
    1.370 -> 1.319 s per step at seq 8192, Qwen2.5-VL-7B 0.850 -> 0.816 s
    (`scripts/results/h200_2026-12-01h_rope_ab/`)."""
    mlp: bool = True
    """Fused SwiGLU / GeGLU activation of gated MLPs."""
    vision_mlp: bool = True
    """Mllama's vision MLP in the autocast dtype, without fp32 round trips (bit-identical)."""
    vision_states: bool = True
    """Mllama's vision encoders keep only the layer outputs the model reads (5 of 40), not all of them, and in
    training the model frees the vision output once it is projected."""
    fused_loss: bool = True
    """Chunked linear + cross-entropy loss that never materialises the logits."""
    vision_attention: bool = True
    """The spec's vision-attention forward (Qwen-VL: equal-length windows in one SDPA call)."""
    vision_attention_split: bool | str = True
    """Mllama's vision attention as the exact maskless split (`archs/_mllama_vision_attention.py`; 0.728 -> 0.637 s
    per Llama-3.2-11B-Vision step on an H200, as one flash varlen call). Where every image of the batch has the
    same count of real patches, two dense SDPA calls; else, or with ``"varlen"``, the one varlen call. Needs
    `vision_attention` on too."""
    cross_attention_split: bool | str = True
    """Mllama's text cross-attention without its [S, V] mask, where every sample has the one-image mask form (else
    stock): dense SDPA calls over the visible keys where every sample sees as many, else (or with ``"varlen"``)
    one flash varlen call. Llama-3.2-11B-Vision on an H200, as the varlen call: 1.479 -> 1.417 s per step at seq
    8192, 0.608 -> 0.601 s at 2048 (`scripts/results/h200_2026-12-01e_cross_ab/`)."""
    lora: bool = True
    """peft LoRA on bitsandbytes 4-bit linears as one autograd op (bound by `get_peft_model`)."""
    cuda_graphs: bool = True
    """With activation checkpointing on CUDA, each layer's forward and recompute+backward replayed as CUDA graphs."""
    mlp_lean_recompute: bool | int = True
    """In checkpointed layers whose MLP output only enters the residual add (the spec's ``lean_mlp`` classes), the
    fused gated MLP saves only its input, skips its forward in the recompute and recomputes gate/up per 4096-token
    chunk in its backward (`training/lean_mlp.py`): one matmul less per layer and a smaller peak. An int sets the
    tokens per chunk instead. Measured (H200, seq 2048/8192): Qwen2.5-VL-7B 0.289 -> 0.265 s and 0.872 -> 0.838 s
    per step, Llama-3.2-11B-Vision 0.597 -> 0.579 s and 1.405 -> 1.364 s, peaks equal or lower."""
    precompile: bool | str = "process"
    """Compile the bound Triton kernels (RMSNorm, SwiGLU/GeGLU, rotary, the loss) before the first step needs them
    (`training/precompile.py`). ``"process"`` (default): a helper process, started as the weights begin to load,
    compiles them into Triton's disk cache (no GIL shared; a second CUDA context for a few seconds; skipped with
    less than 2 GiB free on the device). H200, fresh caches (`scripts/results/h200_2026-12-02v_twentyseventh/`,
    Llama-3.2-11B-Vision at 2048): first step 7.4 s against 11.3 s without it, load 4.7 s against 5.4 s (peft's
    injection 0.77 against 0.83 s). Before the LoRA set-up moved to the meta device (`training/lora_init.py`)
    the helper slowed peft's 700-1,000 blocking host-to-device copies by 1.3-4 s, which kept it opt-in.
    ``True``: in threads started by `get_peft_model` before peft's injection (the compiles hold the GIL beside
    the injection). ``False``: the first step compiles them."""
    cuda_graphs_capture: str = "first_backward"
    """When a layer's graphs are captured: ``"first_backward"`` (in the backward of its first call, where the
    optimizer has no state yet and the forward's working set is gone) or ``"second_forward"`` (in its second
    forward, beside that step's live activations and the optimizer state: a higher peak). H200, peak allocated:
    Llama-3.2-11B-Vision 8.64 -> 8.44 GiB at seq 2048 (9.73 -> 9.48 at 8192, across commands), Qwen2.5-VL-7B
    6.86 -> 6.66 and 8.05 -> 7.83 GiB (one command); the same step times. The captures move into step 1, and
    steps 1 + 2 take less in all: Qwen2.5-VL-7B at 2048, 4.4 + 0.3 s against 3.3 + 2.0 s with warm compile caches,
    14.7 + 0.3 s against 17.3 + 4.1 s with empty ones (`scripts/results/h200_2026-12-02e_eleventh/`)."""

    def __post_init__(self) -> None:
        from hf_fastvision.training.cuda_graphs import CAPTURE_POINTS

        if self.cuda_graphs_capture not in CAPTURE_POINTS:
            raise ValueError(f"cuda_graphs_capture must be one of {CAPTURE_POINTS}, got {self.cuda_graphs_capture!r}")
        if self.precompile not in (True, False, "process"):
            raise ValueError(f"precompile must be True, False or 'process', got {self.precompile!r}")
        for name in ("vision_attention_split", "cross_attention_split"):
            if getattr(self, name) not in (True, False, "varlen"):
                raise ValueError(f"{name} must be True, False or 'varlen', got {getattr(self, name)!r}")

    @classmethod
    def from_value(cls, value: Any) -> PatchOptions:
        if isinstance(value, PatchOptions):
            return value
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(rms_norm=False, rope=False, mlp=False, vision_mlp=False, vision_states=False,
                       cross_attention_split=False,
                       mlp_lean_recompute=False,
                       fused_loss=False, vision_attention=False,
                       vision_attention_split=False, lora=False, cuda_graphs=False, precompile=False)
        if isinstance(value, dict):
            unknown = set(value) - set(asdict(cls()))
            if unknown:
                raise ValueError(f"Unknown patch names {sorted(unknown)}; valid: {sorted(asdict(cls()))}")
            return cls(**value)
        raise TypeError(f"patches must be a bool, a dict of flags or PatchOptions, got {type(value).__name__}")


def original_forward(module: nn.Module) -> Any:
    """The forward a patched module had before `_bind` (its instance override, else its class's), bound."""
    original = module.__dict__.get(_ORIGINAL)
    return original if original is not None else type(module).forward.__get__(module)


def _bind(module: nn.Module, kind: str, forward: Any) -> bool:
    if _ORIGINAL in module.__dict__:
        return False  # already patched
    module.__dict__[_ORIGINAL] = module.__dict__.get("forward")
    module.__dict__[_KIND] = kind
    module.forward = types.MethodType(forward, module)
    return True


_ROPE_NAME = "apply_rotary_pos_emb"
_ROPE_FORWARDS: dict[Any, Any] = {}  # a class's forward -> its copy calling the fused kernel (None: not possible)


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _with_global(fn: Any, name: str, value: Any) -> Any:
    """A copy of function `fn` in which the global `name` is `value`, rebuilt through `functools.wraps`-style
    decorators (each wrapper is copied with its closure cell for the wrapped function pointing at the copy).
    None when `fn`'s innermost code does not read `name`, or a wrapper does not hold what it wraps in a cell."""
    inner = getattr(fn, "__wrapped__", None)
    if not isinstance(fn, types.FunctionType):
        return None
    if inner is None:
        if name not in fn.__code__.co_names:
            return None
        scope = dict(fn.__globals__)
        scope[name] = value
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = _with_global(inner, name, value)
        cells = fn.__closure__ or ()
        at = [i for i, cell in enumerate(cells) if _cell_value(cell) is inner]
        if new_inner is None or len(at) != 1:
            return None
        closure = tuple(types.CellType(new_inner) if i == at[0] else cell for i, cell in enumerate(cells))
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        copy.__dict__.update(fn.__dict__)
        copy.__wrapped__ = new_inner
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    copy.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    return copy


def _rope_forward(module: nn.Module) -> Any:
    """The class forward of `module` with the fused RoPE kernel in place of its module's `apply_rotary_pos_emb`
    (cached per class forward), or None when that forward does not call it by that name."""
    forward = type(module).forward
    if forward not in _ROPE_FORWARDS:
        from hf_fastvision.kernels.rope import apply_rotary_pos_emb

        _ROPE_FORWARDS[forward] = _with_global(forward, _ROPE_NAME, apply_rotary_pos_emb)
    return _ROPE_FORWARDS[forward]


def _rms_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from hf_fastvision.kernels import rms_norm

    return rms_norm(hidden_states, self.weight, self._hffv_eps, offset=self._hffv_offset)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from hf_fastvision.kernels import geglu, swiglu

    op = swiglu if self._hffv_act == "silu" else geglu
    chunk = self.__dict__.get("_hffv_lean_chunk")
    check = self.__dict__.get("_hffv_lean_check")  # (parent layer ref, predicate) where the spec makes it depend
    if chunk and (check is None or check[1](check[0]())):  # `mlp_lean_recompute`: the MLP output only enters the
        # residual add in this layer (`training/lean_mlp.py`)
        from hf_fastvision.training.lean_mlp import lean_mlp_forward

        out = lean_mlp_forward(self, x, op, chunk)
        if out is not NotImplemented:
            return out
    # gate/up are this forward's own temporaries: the backward may write their gradients over them
    return self.down_proj(op(self.gate_proj(x), self.up_proj(x), overwrite_inputs=True))


def _lean_rule(spec: ArchSpec, layer_kind: str) -> Any:
    """The spec's ``lean_mlp`` entry for a layer class: True, a predicate of the layer instance, or None."""
    for entry in spec.patches.get("lean_mlp", ()):
        if isinstance(entry, tuple) and entry[0] == layer_kind:
            return entry[1]
        if entry == layer_kind:
            return True
    return None


def _parent(model: nn.Module, name: str) -> nn.Module:
    """The module that owns the module at ``name``."""
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def _activation(act: nn.Module) -> str | None:
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh") or (
        isinstance(act, nn.GELU) and act.approximate == "tanh"
    ):
        return "gelu_tanh"
    return None


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name.startswith(r + ".") for r in roots)


def _fused_loss_forward(self: nn.Module, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
    original = original_forward(self)
    if labels is None:
        return original(*args, **kwargs)
    if self.training and torch.is_grad_enabled():  # training without `for_training` (e.g. peft's own set-up)
        allocator.enable_for_training()  # a no-op once done (see `allocator`)
    num_items = kwargs.pop("num_items_in_batch", None)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = self.get_submodule(self._hffv_text_root).register_forward_hook(grab)
    try:
        out = original(*args, logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    from hf_fastvision.kernels import fused_linear_cross_entropy

    hidden = captured["hidden"]
    head = self.get_output_embeddings()
    out.loss = fused_linear_cross_entropy(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]),
        head.weight,
        labels[:, 1:].reshape(-1).to(hidden.device),
        bias=head.bias,
        num_items_in_batch=num_items,
        logit_softcapping=self._hffv_softcap,
    )
    return out


def _with_signature_of(original: Any, replacement: Any) -> Any:
    """`replacement` advertising `original`'s signature (generate() validates kwargs against forward's)."""

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return replacement(self, *args, **kwargs)

    return forward


def _can_fuse_loss(model: nn.Module) -> bool:
    params = inspect.signature(type(model).forward).parameters
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return "logits_to_keep" in params and type(head) is nn.Linear


def _stop_hub_kernels(model: nn.Module) -> None:
    """Turn transformers' Hub kernels off on ``model`` before binding ours (transformers >= 5.25 loads with
    ``use_kernels=True`` by default where the `kernels` package is installed, and re-kernelizes at every
    ``train()`` / ``eval()``, replacing or removing the instance forwards of its kernel layers: ours too)."""
    if getattr(model, "use_kernels", False) and callable(getattr(model, "reset_kernels", None)):
        model.reset_kernels()  # the stock forwards back, and no re-kernelization at mode switches
        logger.info("transformers' Hub kernels turned off on this model: hf_fastvision's patches replace them")


def apply_patches(model: nn.Module, spec: ArchSpec | None = None, options: Any = None) -> dict[str, int]:
    """Bind the spec's kernels onto `model`'s modules; returns how many modules each patch touched."""
    spec = spec or get_arch(model.config)
    opts = PatchOptions.from_value(options)
    model.__dict__["_hffv_patch_options"] = opts  # get_peft_model reads the `lora` flag
    counts = {"rms_norm": 0, "rope": 0, "mlp": 0, "fused_loss": 0, "vision_attention": 0, "vision_states": 0,
              "cross_attention": 0}
    if spec.generic or not spec.patches:
        return counts
    _stop_hub_kernels(model)
    roots = resolve_roots(spec, model)
    scope = roots.language + roots.vision
    norm_kind = spec.patches.get("rms_norm")
    attention = spec.patches.get("vision_attention") if opts.vision_attention else None
    if attention is None and opts.vision_attention and opts.vision_attention_split:
        attention = spec.patches.get("vision_attention_split")  # counted as vision_attention
    vision_mlp = spec.patches.get("vision_mlp") if opts.vision_mlp else None
    states = spec.patches.get("vision_states") if opts.vision_states else None
    release = spec.patches.get("vision_output") if opts.vision_states else None  # (class name, forward)
    cross = spec.patches.get("cross_attention_split", ()) if opts.cross_attention_split else ()
    rope = bool(spec.patches.get("rope")) and opts.rope
    for name, module in model.named_modules():
        if cross and (name in roots.language or _under(name, roots.language)):
            match = [(f, k) for suffix, f, k in _cross_entries(cross) if type(module).__name__.endswith(suffix)]
            if match:
                forward, kind = match[0]
                bound = _bind(module, "cross_attention_split", forward)
                counts["cross_attention"] += int(bound and kind == "attention")
                module.__dict__["_hffv_split_varlen"] = opts.cross_attention_split == "varlen"
                continue
        if release and type(module).__name__ == release[0]:
            counts["vision_states"] += _bind(module, "vision_states", release[1])
            continue
        if not _under(name, scope):
            continue
        if attention and _under(name, roots.vision) and type(module).__name__.endswith(attention[0]):
            if _bind(module, "vision_attention", attention[1]):
                counts["vision_attention"] += 1
                module.__dict__["_hffv_rope"] = rope  # the spec's forward reads it (fused rotary where it has one)
                module.__dict__["_hffv_split_varlen"] = opts.vision_attention_split == "varlen"
            continue
        if states and _under(name, roots.vision) and type(module).__name__.endswith(states[0]):
            if states[2](module, name, model):  # the spec's own check (and set-up) for this instance
                counts["vision_states"] += _bind(module, "vision_states", states[1])
            continue
        if vision_mlp and _under(name, roots.vision) and type(module).__name__.endswith(vision_mlp[0]):
            counts["mlp"] += _bind(module, "mlp", vision_mlp[1])
            continue
        if rope and _under(name, roots.language) and type(module).__name__.endswith("Attention"):
            forward = _rope_forward(module)
            if forward is not None:
                counts["rope"] += _bind(module, "rope", forward)
            continue
        if opts.rms_norm and norm_kind and type(module).__name__.endswith("RMSNorm") and isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            if eps is None:
                continue
            module.__dict__["_hffv_eps"] = float(eps)
            module.__dict__["_hffv_offset"] = 1.0 if norm_kind == "gemma" else 0.0
            counts["rms_norm"] += _bind(module, "rms_norm", _rms_forward)
        elif opts.mlp and spec.patches.get("mlp") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            act = _activation(module.act_fn)
            if act is None:
                continue
            module.__dict__["_hffv_act"] = act
            layer = _parent(model, name) if opts.mlp_lean_recompute else None
            rule = _lean_rule(spec, type(layer).__name__) if layer is not None else None
            module.__dict__.pop("_hffv_lean_check", None)
            if rule is not None:
                from hf_fastvision.training.lean_mlp import chunk_tokens

                module.__dict__["_hffv_lean_chunk"] = chunk_tokens(opts.mlp_lean_recompute)
                if callable(rule):
                    module.__dict__["_hffv_lean_check"] = (weakref.ref(layer), rule)
            else:
                module.__dict__.pop("_hffv_lean_chunk", None)
            counts["mlp"] += _bind(module, "mlp", _gated_mlp_forward)
    if opts.fused_loss and roots.language and _can_fuse_loss(model):
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model.__dict__["_hffv_text_root"] = roots.language[0]
        model.__dict__["_hffv_softcap"] = getattr(text_config, "final_logit_softcapping", None)
        counts["fused_loss"] += _bind(model, "fused_loss", _with_signature_of(type(model).forward, _fused_loss_forward))
    return counts


def _cross_entries(cross: tuple) -> list[tuple[str, Any, str]]:
    """The spec's ``cross_attention_split`` value ``((attention suffix, forward), (text model suffix, forward))``
    as ``(suffix, forward, kind)`` rows."""
    (attn_suffix, attn_forward), (model_suffix, model_forward) = cross
    return [(attn_suffix, attn_forward, "attention"), (model_suffix, model_forward, "text_model")]


def _lora_fusable(module: nn.Module, x: Any) -> bool:
    """Whether this peft bnb-4bit LoRA call is the plain case the fused op computes exactly."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    dropout = module.lora_dropout[name]
    if module.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) != 0.0:
        return False
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    # FSDP wraps the LoRA linears as units of their own and gathers their weights only when *their* forward runs
    # (FSDP1: the module is a wrapper, the weight a view of a freed flat parameter; FSDP2: a DTensor), so sharded
    # layers keep peft's path, which calls them.
    if not (type(lora_a) is nn.Linear and type(lora_b) is nn.Linear) or lora_a.bias is not None or lora_b.bias is not None:
        return False
    base = module.get_base_layer()
    bias = getattr(base, "bias", None)
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and (getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)) is not None
        and (bias is None or not bias.requires_grad)
        and all(_materialised(w) for w in (lora_a.weight, lora_b.weight, base.weight))
    )


def _materialised(weight: torch.Tensor) -> bool:
    return type(weight).__name__ != "DTensor" and weight.untyped_storage().size() > 0


def lora_4bit_parts(module: nn.Module) -> tuple:
    """``(weight, quant_state, lora_a, lora_b, scaling, bias)`` of a peft 4-bit LoRA layer's active adapter: what
    the fused op (`lora_linear_4bit`) and its graph-free gradients (`lora_linear_4bit_grads`) take."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    name = module.active_adapters[0]
    base = module.get_base_layer()
    fix_4bit_weight_quant_state_from_module(base)  # FSDP flattening drops it from the parameter; the module keeps it
    return (base.weight, base.weight.quant_state, module.lora_A[name].weight, module.lora_B[name].weight,
            module.scaling[name], base.bias)


def _lora_4bit_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs or not _lora_fusable(self, x):
        return original_forward(self)(x, *args, **kwargs)
    from hf_fastvision.kernels.lora_linear_4bit import lora_linear_4bit

    return lora_linear_4bit(x, *lora_4bit_parts(self))


def apply_lora_patches(model: nn.Module, options: Any = None) -> int:
    """Bind the fused 4-bit LoRA op onto every peft ``Linear4bit`` LoRA layer; returns how many were bound.

    Options default to the ones the model was loaded with (`patches=` of `from_pretrained`). Calls the fused op
    cannot compute exactly (several active adapters, dropout while training, DoRA and other variants, merged or
    disabled adapters, trainable base bias) run peft's own forward.
    """
    opts = PatchOptions.from_value(options if options is not None else model.__dict__.get("_hffv_patch_options"))
    if not opts.lora:
        return 0
    from hf_fastvision.quantization import canonical_4bit, keep_canonical_packing

    # the fused op dequantizes the canonical layout: undo a CPU GEMV repacking done before (a model not loaded by
    # us), and keep bitsandbytes from doing one later
    keep_canonical_packing(model)
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ == "Linear4bit" and cls.__module__.startswith("peft.") and hasattr(module, "lora_A"):
            canonical_4bit(module.get_base_layer().weight)
            count += _bind(module, "lora", _lora_4bit_forward)
    return count


def unpatch(model: nn.Module) -> int:
    """Restore every patched module's original forward; returns how many were restored."""
    restored = 0
    for module in model.modules():
        module.__dict__.pop(_SUSPENDED, None)
        if _ORIGINAL in module.__dict__:
            module.__dict__.pop(_KIND, None)
            restore_forward(module, module.__dict__.pop(_ORIGINAL))
            restored += 1
    return restored


def restore_forward(module: nn.Module, previous: Any) -> None:
    """Put back the instance forward a binding replaced (None: there was none, the class forward serves)."""
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def _restore_original(module: nn.Module) -> None:
    restore_forward(module, module.__dict__[_ORIGINAL])


def suspend_patches(model: nn.Module) -> int:
    """Run the stock forwards until `resume_patches` (what `for_inference` does).

    The kernels are training kernels (their win is the backward and the loss); for generation the stock modules are
    what `torch.compile` fuses and CUDA-graphs best, and what `generate` is compared against. Returns how many
    modules were switched; idempotent.
    """
    count = 0
    for module in model.modules():
        if _ORIGINAL in module.__dict__ and _SUSPENDED not in module.__dict__:
            module.__dict__[_SUSPENDED] = module.__dict__["forward"]
            _restore_original(module)
            count += 1
    return count


def resume_patches(model: nn.Module) -> int:
    """Bind the kernels suspended by `suspend_patches` again (what `for_training` does); returns how many."""
    count = 0
    for module in model.modules():
        if _SUSPENDED in module.__dict__:
            module.forward = module.__dict__.pop(_SUSPENDED)
            count += 1
    return count


def patches_active(model: nn.Module) -> bool:
    """Whether any patch is bound and not suspended."""
    return any(_ORIGINAL in m.__dict__ and _SUSPENDED not in m.__dict__ for m in model.modules())


def patched_modules(model: nn.Module) -> dict[str, str]:
    """Module path → patch kind, for inspection and tests."""
    return {name: m.__dict__[_KIND] for name, m in model.named_modules() if _KIND in m.__dict__}


@contextlib.contextmanager
def unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` with its stock forwards for the duration (e.g. to compare logits bit for bit with stock
    transformers); the patches are bound again afterwards."""
    saved = {}
    for module in model.modules():
        if _ORIGINAL in module.__dict__ and _SUSPENDED not in module.__dict__:
            saved[module] = module.__dict__["forward"]
            _restore_original(module)
    try:
        yield model
    finally:
        for module, forward in saved.items():
            module.forward = forward
