"""block_attention at the model's shapes (32 q heads / 2 KV heads, D 128, 16 block tokens) against
`scaled_dot_product_attention` over a concatenated [context | block] K/V (one call per row: the
straightforward way), and against a plain matmul of the same shape ([256 x 128] @ [128 x ctx]) measured in
the same run as the machine's practical matrix rate. FLOPs = 4 * S * Hq * D * sum_b (ctx_b + S);
bytes = the K/V read once per KV head + q, out and lse.

"%mm" is of the matmul the kernel actually runs: on a CPU whose native bf16/fp16 GEMM does not run, the
kernel widens 16-bit inputs to fp32 (csrc/common/cpu_gemm_torch.cpp), and torch's same-dtype bf16 matmul is a
slow fallback there, so the limit is the faster of the same-dtype and the fp32 rate, both measured next to
each row. On a GPU it adds the
share of the bf16 dense tensor peak, flash-attn's flash_attn_with_kvcache where that is installed, and the
time of every kernel path the GPU can run (TMA + wgmma on sm_90, mma.sync, SIMT) next to the default one.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["device", "dtype", "B", "ctx_lens", "median_us", "p10-p90_us", "MB", "GFLOP", "GFLOP/s", "mm_GFLOP/s",
           "%mm", "%peak", "sdpa_us", "vs_sdpa", "fa_us", "vs_fa", "wgmma_us", "vs_wgmma", "mma_us", "vs_mma", "simt_us",
           "vs_simt", "other_cores", "load1"]

S, HQ, HKV, D = 16, 32, 2, 128
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peak (spec sheet)


def _inputs(lens, dtype, device, gen):
    B, L = len(lens), max(lens)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return (rnd(B, S, HQ, D), rnd(B, S, HKV, D), rnd(B, S, HKV, D), rnd(B, L + S, HKV, D)[:, :L],
            rnd(B, L + S, HKV, D)[:, :L], torch.tensor(lens, dtype=torch.int32, device=device))


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


@contextlib.contextmanager
def _forced_path(path):
    """TWOTOWER_ATTN_PATH=path inside the block (the CUDA binding reads it on every call), restored after."""
    old = os.environ.get("TWOTOWER_ATTN_PATH")
    os.environ["TWOTOWER_ATTN_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TWOTOWER_ATTN_PATH")
        else:
            os.environ["TWOTOWER_ATTN_PATH"] = old


def _peak_tflops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt

    gen = torch.Generator().manual_seed(0)
    if quick:
        cases = [[4096]]
    elif device == "cuda":  # the sweep that matters on a GPU: B {1,4,16} x ctx {1K,4K,32K,128K}, plus ragged
        cases = [[n] * b for b in (1, 4, 16) for n in (1024, 4096, 32768, 131072)] + [[32768, 4096, 1024, 0]]
    else:
        cases = [[4096], [32768], [4096] * 4, [32768, 4096, 1024, 0]]
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16,)
    n_buf = 4 if device == "cuda" else 1  # rotate inputs on the GPU so L2 is cold
    fa = _flash_attn() if device == "cuda" else None
    peak = _peak_tflops(device)
    rows = []
    mm_ctx = 4096 if device == "cpu" else 32768  # a GEMM's rate is flat in ctx past a few K columns
    for dtype in dtypes:
        for lens in cases:
            # The practical limit, the same-shape matmul, measured next to each case: a shared machine's
            # load drifts within a run.
            mm = harness.measure_matmul_rate(S * HQ // HKV, D, mm_ctx, dtype, device) * 1e3
            best = max(mm, harness.measure_matmul_rate(S * HQ // HKV, D, mm_ctx, torch.float32, device) * 1e3) \
                if device == "cpu" and dtype != torch.float32 else mm
            bufs = [_inputs(lens, dtype, device, gen) for _ in range(n_buf)]
            t = harness.time_fn(lambda i: (lambda: tt.block_attention(*bufs[i])), device, n_buffers=n_buf)
            ts = harness.time_fn(lambda i: (lambda: _sdpa(*bufs[i][:5], lens)), device, n_buffers=n_buf)
            keys = sum(n + S for n in lens)
            elt = torch.finfo(dtype).bits // 8
            flops = 4 * S * HQ * D * keys
            nbytes = 2 * HKV * D * elt * keys + 2 * len(lens) * S * HQ * D * elt + len(lens) * HQ * S * 4
            gflops = flops / t.median_s / 1e9
            row = {"device": device, "dtype": str(dtype).replace("torch.", ""), "B": len(lens),
                   "ctx_lens": "/".join(str(n) for n in lens), "median_us": t.median_s * 1e6,
                   "p10-p90_us": t.spread, "MB": nbytes / 1e6, "GFLOP": flops / 1e9, "GFLOP/s": gflops,
                   "mm_GFLOP/s": best, "%mm": 100 * gflops / best,
                   "%peak": 100 * gflops / (peak * 1e3) if peak else "", "sdpa_us": ts.median_s * 1e6,
                   "vs_sdpa": ts.median_s / t.median_s, **harness.load_fields(t, ts)}
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
                    with _forced_path(path):
                        try:
                            tt.block_attention(*bufs[0])
                        except RuntimeError:  # e.g. wgmma off sm_90: the path cannot run these inputs here
                            continue
                        tb = harness.time_fn(lambda i: (lambda: tt.block_attention(*bufs[i])), device,
                                             n_buffers=n_buf)
                    row.update({f"{path}_us": tb.median_s * 1e6, f"vs_{path}": tb.median_s / t.median_s})
            rows.append(row)
    harness.print_table(f"block_attention on {device} (32q/2kv heads, D {D}, S {S}; %mm = of the faster of the "
                        f"same-dtype and fp32 [256x128]@[128x{mm_ctx}] matmul measured next to each row)", rows, COLUMNS)
    return rows
