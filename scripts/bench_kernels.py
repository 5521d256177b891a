#!/usr/bin/env python
"""Benchmark the fused Triton kernels of ``hf_fastvision.kernels`` against their torch references.

GPU only (not a test). Prints a Markdown table: forward and forward+backward time (median of
``triton.testing.do_bench``), speed-up and peak extra memory of forward+backward.

    python scripts/bench_kernels.py                      # all ops, bf16 (fp16 where bf16 is unsupported)
    python scripts/bench_kernels.py --ops rms_norm,flce --dtype float16 --scale 0.5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="rms_norm,rms_norm_gemma,rope,mrope,mrope_interleaved,swiglu,geglu,flce",
                   help="comma separated subset")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 where supported, else float16")
    p.add_argument("--tokens", type=int, default=8192, help="batch * seq rows")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the token count (quick runs: 0.25)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    return p.parse_args()


def _leaves(args, grad_idx):
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i in grad_idx:
            a = a.detach().clone().requires_grad_(True)
        out.append(a)
    return out


def _bench_one(fn: Callable, args: tuple, grad_idx: tuple[int, ...], kwargs: dict, warmup: int, rep: int):
    import triton.testing

    leaves = _leaves(args, grad_idx)

    def fwd():
        with torch.no_grad():
            fn(*leaves, **kwargs)

    out = fn(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]
    del out, outs

    def fwd_bwd():
        o = fn(*leaves, **kwargs)
        o = o if isinstance(o, tuple) else (o,)
        torch.autograd.backward(o, grads)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                t.grad = None

    t_fwd = triton.testing.do_bench(fwd, warmup=warmup, rep=rep, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, warmup=warmup, rep=rep, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return t_fwd, t_fb, peak


def _cases(dtype: torch.dtype, n_tok: int):
    from hf_fastvision import kernels as K
    from hf_fastvision.kernels.fused_linear_cross_entropy import FusedLinearCrossEntropyFunction
    from hf_fastvision.kernels.rms_norm import RMSNormFunction
    from hf_fastvision.kernels.rope import _apply_triton, mrope_axis_map

    dev = "cuda"
    hidden, inter, vocab = 3584, 18944, 152064  # Qwen2-VL-7B text model
    n_qh, n_kh, head_dim = 28, 4, 128
    bsz = 4
    seq = max(1, n_tok // bsz)
    section = [16, 24, 24]

    def rand(*shape, dt=dtype, s=1.0):
        return torch.randn(*shape, device=dev, dtype=dt) * s

    cases = {}

    x, w = rand(n_tok, hidden), rand(hidden, s=0.1) + 1
    cases["rms_norm"] = (f"[{n_tok},{hidden}]",
                         lambda x, w: RMSNormFunction.apply(x, w, 1e-6, 0.0, None),
                         lambda x, w: K.rms_norm_ref(x, w, 1e-6), (x, w), (0, 1), {})
    cases["rms_norm_gemma"] = (f"[{n_tok},{hidden}] offset=1",
                               lambda x, w: RMSNormFunction.apply(x, w, 1e-6, 1.0, None),
                               lambda x, w: K.rms_norm_ref(x, w, 1e-6, 1.0), (x, w), (0, 1), {})

    q, k = rand(bsz, n_qh, seq, head_dim), rand(bsz, n_kh, seq, head_dim)
    pos = torch.arange(seq, device=dev)[None].expand(bsz, -1)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32) / head_dim))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    cases["rope"] = (f"q[{bsz},{n_qh},{seq},{head_dim}] k[..{n_kh}..]",
                     lambda q, k, c, s: _apply_triton(q, k, c, s, 1, None),
                     K.apply_rotary_pos_emb_ref, (q, k, cos, sin), (0, 1), {})
    emb3 = torch.stack([emb, emb * 0.5, emb * 0.25])
    cos3, sin3 = emb3.cos().to(dtype), emb3.sin().to(dtype)
    for name, inter_flag in (("mrope", False), ("mrope_interleaved", True)):
        axis = mrope_axis_map(head_dim, section, inter_flag)
        cases[name] = (f"q[{bsz},{n_qh},{seq},{head_dim}] cos[3,..] {section}",
                       (lambda a: lambda q, k, c, s: _apply_triton(q, k, c, s, 1, a))(axis),
                       (lambda f: lambda q, k, c, s: K.apply_multimodal_rotary_pos_emb_ref(q, k, c, s, section, f))(
                           inter_flag),
                       (q, k, cos3, sin3), (0, 1), {})

    g, u = rand(n_tok, inter), rand(n_tok, inter)
    cases["swiglu"] = (f"[{n_tok},{inter}]", K.SwiGLUFunction.apply, K.swiglu_ref, (g, u), (0, 1), {})
    cases["geglu"] = (f"[{n_tok},{inter}]", K.GeGLUFunction.apply, K.geglu_ref, (g, u), (0, 1), {})

    n_ce = n_tok // 2
    h, lm = rand(n_ce, hidden), rand(vocab, hidden, s=hidden**-0.5)
    labels = torch.randint(0, vocab, (n_ce,), device=dev)
    labels[::7] = -100
    cases["flce"] = (f"h[{n_ce},{hidden}] W[{vocab},{hidden}] frozen W",
                     lambda h, W, y: FusedLinearCrossEntropyFunction.apply(h, W, y, None, -100, None, None, None,
                                                                           True, torch.is_grad_enabled()),
                     lambda h, W, y: K.fused_linear_cross_entropy_ref(h, W, y), (h, lm, labels), (0,), {})
    return cases


def main() -> int:
    args = _parse()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    from hf_fastvision.kernels import preferred_half_dtype

    dtype = getattr(torch, args.dtype) if args.dtype else preferred_half_dtype("cuda")
    n_tok = max(8, int(args.tokens * args.scale))
    cases = _cases(dtype, n_tok)
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in cases]
    if unknown:
        print(f"unknown ops {unknown}; known: {list(cases)}", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    import triton

    print(f"device: {props.name}, torch {torch.__version__}, triton {triton.__version__}, dtype {dtype}\n")
    print("| op | shape | impl | fwd ms | fwd+bwd ms | speed-up fwd+bwd | peak MiB fwd+bwd |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in wanted:
        shape, fused, ref, targs, gidx, kw = cases[name]
        rows = []
        for impl, fn in (("torch", ref), ("triton", fused)):
            try:
                rows.append((impl, *_bench_one(fn, targs, gidx, kw, args.warmup, args.rep)))
            except torch.OutOfMemoryError:
                rows.append((impl, float("nan"), float("nan"), float("nan")))
            torch.cuda.empty_cache()
        t_ref = rows[0][2]
        for impl, t_f, t_fb, peak in rows:
            speed = t_ref / t_fb if t_fb == t_fb and t_fb > 0 else float("nan")
            print(f"| {name} | {shape} | {impl} | {t_f:.3f} | {t_fb:.3f} | {speed:.2f}x | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
