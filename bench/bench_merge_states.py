"""merge_states: the compiled kernel against the same merge written the lean PyTorch way (logsumexp over the
parts, exp, one weighted sum), timed the same way. The clarity-first reference (reference.merge_states, with
its empty-part masking) is a test oracle, not a speed baseline, and is not timed here.

Shapes: the split-KV merge of the denoiser attention (B x 16 tokens x 32 heads rows, D 128) over a sweep of
split counts. The op is memory-bound: bytes = P*M*D*elt + P*M*4 (read) + M*D*elt + M*4 (write); its limit is
a copy of the same number of bytes measured in the same run (in cache for the small rows, DRAM for the big).
"""
from __future__ import annotations

import torch

from . import harness

COLUMNS = ["device", "dtype", "parts", "rows", "D", "median_us", "p10-p90_us", "MB", "GB/s", "copy_GB/s", "%copy",
           "lean_torch_us", "speedup", "other_cores", "load1"]


def lean_merge(o, lse):
    """The fast way to write the merge in PyTorch (no empty parts in these inputs, so no masking)."""
    lse_out = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - lse_out)
    return torch.einsum("pm,pmd->md", w, o.float()).to(o.dtype), lse_out


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt

    rows = []
    shapes = [(2, 512), (8, 512), (32, 512), (8, 8192)] if not quick else [(8, 512)]
    for dtype in (torch.float32, torch.bfloat16):
        for parts, m in shapes:
            D = 128
            n_buf = 8 if device == "cuda" else 1
            bufs = [(torch.randn(parts, m, D, device=device).to(dtype), torch.randn(parts, m, device=device))
                    for _ in range(n_buf)]
            elt = torch.finfo(dtype).bits // 8
            nbytes = parts * m * (D * elt + 4) + m * (D * elt + 4)
            limit = harness.measure_copy_bandwidth(device, nbytes if device == "cpu" else 256 << 20)
            t = harness.time_fn(lambda i: (lambda: tt.merge_states(*bufs[i])), device, n_buffers=n_buf)
            tlean = harness.time_fn(lambda i: (lambda: lean_merge(*bufs[i])), device, n_buffers=n_buf)
            gbps = nbytes / t.median_s / 1e9
            rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "parts": parts, "rows": m,
                         "D": D, "median_us": t.median_s * 1e6, "p10-p90_us": t.spread, "MB": nbytes / 1e6,
                         "GB/s": gbps, "copy_GB/s": limit, "%copy": 100 * gbps / limit,
                         "lean_torch_us": tlean.median_s * 1e6, "speedup": tlean.median_s / t.median_s,
                         **harness.load_fields(t, tlean)})
    harness.print_table(f"merge_states on {device} (%copy: of a copy of the same bytes measured next to each row)",
                        rows, COLUMNS)
    return rows
