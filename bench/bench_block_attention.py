"""block_attention at the model's shapes (32 q heads / 2 KV heads, D 128, 16 block tokens) against
`scaled_dot_product_attention` over a concatenated [context | block] K/V (one call per row: the
straightforward way), and against a plain matmul of the same shape ([256 x 128] @ [128 x ctx]) measured in
the same run as the machine's practical matrix rate. FLOPs = 4 * S * Hq * D * sum_b (ctx_b + S);
bytes = the K/V read once per KV head + q, out and lse.

"%mm" is of the faster of the same-dtype and the fp32 matmul of the kernel's tile shape, both measured next to each
row (torch's bf16 matmul is a slow fallback on a CPU without native bf16 units). On the CPU, bf16 rows come once
per way the kernel can multiply bf16 tiles that this CPU runs (`path`, forced with TWOTOWER_ATTN_CPU_ISA: amx =
AMX tiles, avx512_bf16 = vdpbf16ps microkernels, avx2 = widened to fp32 for sgemm; the default path first), with
vs_fp32 = the fp32 row's time over this one's; the width-1/8 model's heads (4 q / 2 kv) run next to the real
model's. With `--baseline` the default path is also timed on the baseline build right before and after this
process's timings (main_us, vs_main; harness.around_baseline).
On a GPU it adds the
share of the bf16 dense tensor peak, flash-attn's flash_attn_with_kvcache where that is installed, and the
time of every kernel path the GPU can run (TMA + wgmma on sm_90, mma.sync, SIMT) next to the default one.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["device", "heads", "dtype", "path", "B", "ctx_lens", "median_us", "p10-p90_us", "main_us", "vs_main",
           "vs_fp32", "MB", "GFLOP", "GFLOP/s", "mm_GFLOP/s", "%mm", "%peak", "sdpa_us", "vs_sdpa", "fa_us", "vs_fa",
           "wgmma_us", "vs_wgmma", "mma_us", "vs_mma", "simt_us", "vs_simt", "other_cores", "load1"]

S, HQ, HKV, D = 16, 32, 2, 128
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peak (spec sheet)


HEADS = {"32q/2kv": (32, 2), "4q/2kv": (4, 2)}   # the real model's; the width-1/8 model's
CPU_PATHS = ("amx", "avx512_bf16", "avx2")       # TWOTOWER_ATTN_CPU_ISA values with distinct bf16 code


def _inputs(lens, dtype, device, gen, hq=HQ, hkv=HKV):
    B, L = len(lens), max(lens)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return (rnd(B, S, hq, D), rnd(B, S, hkv, D), rnd(B, S, hkv, D), rnd(B, L + S, hkv, D)[:, :L],
            rnd(B, L + S, hkv, D)[:, :L], torch.tensor(lens, dtype=torch.int32, device=device))


def _cases(device, quick):
    """(heads, ctx_lens) per row."""
    if quick:
        return [("32q/2kv", [4096])]
    if device == "cuda":  # the sweep that matters on a GPU: B {1,4,16} x ctx {1K,4K,32K,128K}, plus ragged
        return [("32q/2kv", [n] * b) for b in (1, 4, 16) for n in (1024, 4096, 32768, 131072)] + \
            [("32q/2kv", [32768, 4096, 1024, 0])]
    return [("32q/2kv", c) for c in ([4096], [32768], [4096] * 4, [32768, 4096, 1024, 0])] + \
        [("4q/2kv", [300]), ("4q/2kv", [2000])]


@contextlib.contextmanager
def _env(name, value):
    """os.environ[name] = value inside the block (None: unset), restored after (the bindings read it per call)."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def kernel_timings(cases, dtypes, device="cpu") -> list[list]:
    """[median_s, p10_s, p90_s, other_cores] of tt.block_attention per (dtype, case) on the default path, inputs
    from seed 0; run in the baseline build's child process (harness.run_in_baseline)."""
    import twotower_ext as tt

    out = []
    for dtype in dtypes:
        for heads, lens in cases:
            gen = torch.Generator().manual_seed(0)
            args = _inputs(lens, getattr(torch, dtype), device, gen, *HEADS[heads])
            t = harness.time_fn(lambda i: (lambda: tt.block_attention(*args)), device)
            out.append([t.median_s, t.p10_s, t.p90_s, t.other_cores])
    return out


def _sdpa(q, k_blk, v_blk, k_ctx, v_ctx, lens):
    """The straightforward version: concatenate each row's context and block K/V, then SDPA (GQA)."""
    outs = []
    for b, n in enumerate(lens):
        k = torch.cat([k_ctx[b, :n], k_blk[b]]).transpose(0, 1)[None]
        v = torch.cat([v_ctx[b, :n], v_blk[b]]).transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, enable_gqa=True))
    return outs


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
        return flash_attn_with_kvcache
    except ImportError:
        return None


def _peak_tflops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt

    cases = _cases(device, quick)
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16,)
    names = [str(d).replace("torch.", "") for d in dtypes]
    mm_ctx = 4096 if device == "cpu" else 32768  # a GEMM's rate is flat in ctx past a few K columns

    def timed_rows():
        n_buf = 4 if device == "cuda" else 1  # rotate inputs on the GPU so L2 is cold
        fa = _flash_attn() if device == "cuda" else None
        peak = _peak_tflops(device)
        rows = []
        fp32_s = {}
        default_bf16 = next((p for p in CPU_PATHS if p in tt.ops.cpu_isas()), None) if device == "cpu" else None
        for d, dtype in enumerate(dtypes):
            for c, (heads, lens) in enumerate(cases):
                hq, hkv = HEADS[heads]
                # The practical limit, the same-shape matmul, measured next to each case: a shared machine's
                # load drifts within a run.
                mm = harness.best_of(harness.measure_matmul_rate, S * hq // hkv, D, mm_ctx, dtype, device) * 1e3
                best = max(mm, harness.best_of(harness.measure_matmul_rate, S * hq // hkv, D, mm_ctx, torch.float32,
                                               device) * 1e3) if device == "cpu" and dtype != torch.float32 else mm
                gen = torch.Generator().manual_seed(0)
                bufs = [_inputs(lens, dtype, device, gen, hq, hkv) for _ in range(n_buf)]
                paths = [None]   # the default, then every other bf16 path this CPU runs
                if device == "cpu" and dtype == torch.bfloat16:
                    paths += [p for p in CPU_PATHS if p in tt.ops.cpu_isas() and p != default_bf16]
                ts = harness.time_fn(lambda i: (lambda: _sdpa(*bufs[i][:5], lens)), device, n_buffers=n_buf)
                keys = sum(n + S for n in lens)
                elt = torch.finfo(dtype).bits // 8
                flops = 4 * S * hq * D * keys
                nbytes = 2 * hkv * D * elt * keys + 2 * len(lens) * S * hq * D * elt + len(lens) * hq * S * 4
                for path in paths:
                    with _env("TWOTOWER_ATTN_CPU_ISA", path):
                        t = harness.time_fn(lambda i: (lambda: tt.block_attention(*bufs[i])), device, n_buffers=n_buf)
                    gflops = flops / t.median_s / 1e9
                    if dtype == torch.float32:
                        fp32_s[c] = t.median_s
                    bf16_default = device == "cpu" and dtype == torch.bfloat16
                    label = path or (f"default ({default_bf16})" if bf16_default else "default")
                    row = {"device": device, "heads": heads, "dtype": names[d], "path": label, "B": len(lens),
                           "ctx_lens": "/".join(str(n) for n in lens), "median_us": t.median_s * 1e6,
                           "p10-p90_us": t.spread, "main_us": "-", "vs_main": "-",
                           "vs_fp32": fp32_s[c] / t.median_s if c in fp32_s else "-", "MB": nbytes / 1e6,
                           "GFLOP": flops / 1e9, "GFLOP/s": gflops, "mm_GFLOP/s": best, "%mm": 100 * gflops / best,
                           "%peak": 100 * gflops / (peak * 1e3) if peak else "", "sdpa_us": ts.median_s * 1e6,
                           "vs_sdpa": ts.median_s / t.median_s, **harness.load_fields(t, ts)}
                    if path is None:
                        pending.append((row, d * len(cases) + c, t.median_s))
                    rows.append(row)
                row = rows[-len(paths)]   # the default path's row gets the GPU-only columns
                if fa is not None:
                    def fa_call(i):
                        q, kb, vb, kc, vc, cl = bufs[i]
                        cache_k = torch.empty(len(lens), max(lens) + S, HKV, D, device=device, dtype=dtype)
                        cache_v = torch.empty_like(cache_k)
                        cache_k[:, :max(lens)] = kc
                        cache_v[:, :max(lens)] = vc
                        return lambda: fa(q, cache_k, cache_v, k=kb, v=vb, cache_seqlens=cl, causal=False)
                    tf = harness.time_fn(fa_call, device, n_buffers=n_buf)
                    row.update({"fa_us": tf.median_s * 1e6, "vs_fa": tf.median_s / t.median_s})
                if device == "cuda":  # every kernel path this GPU can run, next to the default one
                    for path in ("wgmma", "mma", "simt"):
                        with _env("TWOTOWER_ATTN_PATH", path):
                            try:
                                tt.block_attention(*bufs[0])
                            except RuntimeError:  # e.g. wgmma off sm_90: the path cannot run these inputs here
                                continue
                            tb = harness.time_fn(lambda i: (lambda: tt.block_attention(*bufs[i])), device,
                                                 n_buffers=n_buf)
                        row.update({f"{path}_us": tb.median_s * 1e6, f"vs_{path}": tb.median_s / t.median_s})
        return rows

    pending = []   # the default path's rows, filled in with the baseline build's time once it has run
    rows, main = harness.around_baseline("bench_block_attention", "kernel_timings", timed_rows, cases=cases,
                                         dtypes=names, device=device)
    for row, i, s in pending if main is not None else ():
        row.update(main_us=main[i][0] * 1e6, vs_main=main[i][0] / s)
    harness.print_table(f"block_attention on {device} (D {D}, S {S}; %mm = of the faster of the same-dtype and fp32 "
                        f"[S*Hq/Hkv x 128]@[128x{mm_ctx}] matmul measured next to each row)", rows, COLUMNS)
    return rows
