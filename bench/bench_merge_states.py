"""merge_states: the compiled kernel against the same math written with PyTorch ops.

Shapes: the split-KV merge of the denoiser attention (B x 16 tokens x 32 heads rows, D 128) over a
sweep of split counts. The op is memory-bound: bytes = P*M*D*elt + P*M*4 (read) + M*D*elt + M*4 (write).
"""
from __future__ import annotations

import torch

from . import harness

COLUMNS = ["device", "dtype", "parts", "rows", "D", "median_us", "p10-p90_us", "MB", "GB/s", "%copy_bw",
           "torch_us", "speedup"]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext import reference

    limit = harness.measure_copy_bandwidth(device)
    rows = []
    shapes = [(2, 512), (8, 512), (32, 512), (8, 8192)] if not quick else [(8, 512)]
    for dtype in (torch.float32, torch.bfloat16):
        for parts, m in shapes:
            D = 128
            n_buf = 8 if device == "cuda" else 1
            bufs = [(torch.randn(parts, m, D, device=device).to(dtype), torch.randn(parts, m, device=device))
                    for _ in range(n_buf)]
            t = harness.time_fn(lambda i: (lambda: tt.merge_states(*bufs[i])), device, n_buffers=n_buf)
            tref = harness.time_fn(lambda i: (lambda: reference.merge_states(*bufs[i])), device, n_buffers=n_buf)
            elt = torch.finfo(dtype).bits // 8
            nbytes = parts * m * (D * elt + 4) + m * (D * elt + 4)
            gbps = nbytes / t.median_s / 1e9
            rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "parts": parts, "rows": m,
                         "D": D, "median_us": t.median_s * 1e6, "p10-p90_us": t.spread, "MB": nbytes / 1e6,
                         "GB/s": gbps, "%copy_bw": 100 * gbps / limit, "torch_us": tref.median_s * 1e6,
                         "speedup": tref.median_s / t.median_s})
    harness.print_table(f"merge_states on {device} (copy bandwidth measured now: {limit:.1f} GB/s)", rows, COLUMNS)
    return rows
