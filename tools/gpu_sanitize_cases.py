"""One small call of each CUDA kernel, for compute-sanitizer (tools/gpu_check.sh runs this under memcheck and
racecheck): block_attention on every path this GPU has (simt, mma, wgmma on sm_90; a row with one split (direct
write) and a causal row with several (merge)), merge_states, threshold_unmask and mamba_block_scan. Inputs are
made on the CPU and copied, so the sanitizer sees almost only this project's kernels. Prints which attention
kernel really ran for each call (the op's own report). moe_experts with dense, fp8 and int4 expert weights on
the mma path (aligned sizes) and the SIMT one (odd sizes), the path from twotower::cuda_moe_path."""
import math
import os

import torch

import twotower_ext as tt
from twotower_ext import quant


def main() -> None:
    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731

    paths = ["simt", "mma"] + (["wgmma"] if torch.cuda.get_device_capability() == (9, 0) else [])
    for path in paths:
        os.environ["TWOTOWER_ATTN_PATH"] = path
        for causal, lens in ((False, [300, 0]), (True, [2100, 5])):
            B, S, Hq, Hkv, D, L = 2, 16, 8, 2, 128, 2200
            q, kb, vb = (rnd(B, S, h, D).bfloat16().to(dev) for h in (Hq, Hkv, Hkv))
            kc, vc = (rnd(B, L, Hkv, D).bfloat16().to(dev) for _ in range(2))
            ctx = torch.tensor(lens, dtype=torch.int32).to(dev)
            out, lse = tt.block_attention(q, kb, vb, kc, vc, ctx, causal=causal)
            torch.cuda.synchronize()
            print(f"sanitize: block_attention {path} causal={causal}: "
                  f"{torch.ops.twotower.cuda_attention_last_launch()}", flush=True)
    os.environ.pop("TWOTOWER_ATTN_PATH", None)

    o, lse = rnd(3, 5, 64).to(dev), rnd(3, 5).to(dev)
    lse[1, 2] = -math.inf
    tt.merge_states(o, lse)
    torch.cuda.synchronize()
    print("sanitize: merge_states", flush=True)

    MASK, V = 7, 300
    logits = rnd(2, 16, V).to(dev)
    x = torch.full((2, 16), MASK, dtype=torch.int64).to(dev)
    tt.threshold_unmask(logits, x, MASK, 0.5, 3, 8, 0.9, 11, 5)
    # per-row values (row 2: gamma out of range, left untouched; kept past S, clamped), logprob; AR use (mask -1)
    x = torch.full((3, 16), MASK, dtype=torch.int64).to(dev)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32).to(dev)  # noqa: E731
    tt.threshold_unmask(rnd(3, 16, V).to(dev), x, MASK, torch.tensor([0.5, 0.9, 1.5]).to(dev), i32(0, 7, 1),
                        i32(4, 8, 2), torch.tensor([0.0, 0.7, 1.0]).to(dev), torch.tensor([1, -2, 3]).to(dev),
                        torch.tensor([0, 2**40, 5]).to(dev), i32(16, 5, 20), out_logprob=torch.zeros(3, 16, device=dev))
    tt.threshold_unmask(rnd(3, 1, V).to(dev), torch.full((3, 1), -1, dtype=torch.int64).to(dev), -1, 0.9, 0, 1,
                        torch.tensor([0.0, 0.8, 1.2]).to(dev), 11, torch.tensor([4, 5, 6]).to(dev))
    torch.cuda.synchronize()
    print("sanitize: threshold_unmask", flush=True)

    B, Lt, H, P, N, G, K = 2, 16, 4, 16, 16, 1, 4
    C = H * P + 2 * G * N
    xbc, dt = rnd(B, Lt, C).to(dev), rnd(B, Lt, H).to(dev)
    conv, ssm = rnd(B, K - 1, C).to(dev), rnd(B, H, P, N).to(dev)
    tt.mamba_block_scan(xbc, dt, conv, ssm, rnd(C, K).to(dev), rnd(C).to(dev), rnd(H).to(dev), rnd(H).abs().to(dev),
                        rnd(H).to(dev), torch.tensor([16, 9], dtype=torch.int32).to(dev), conv_state_out=conv,
                        ssm_state_out=ssm)
    torch.cuda.synchronize()
    print("sanitize: mamba_block_scan", flush=True)

    for H, I in ((160, 96), (53, 37)):
        x = rnd(6, H).bfloat16().to(dev)
        ids = torch.tensor([[0, 1], [1, 2], [2, 0], [3, 1], [0, 3], [2, 3]]).to(dev)
        wts = torch.rand(6, 2, generator=g).to(dev)
        up, down = rnd(4, I, H) / H ** 0.5, rnd(4, H, I) / I ** 0.5
        tt.ops.moe_experts(x, ids, wts, up.bfloat16().to(dev), down.bfloat16().to(dev))
        for fmt in ("fp8", "int4"):
            qu, qd = (quant.quantize(w, fmt).to(dev) for w in (up, down))
            torch.ops.twotower.moe_experts(x, ids, wts, qu.data, qd.data, qu.scale, qd.scale, qu.group)
        torch.cuda.synchronize()
        paths = [torch.ops.twotower.cuda_moe_path(torch.bfloat16, f, H, I, 128 if f == "int4" else 0)
                 for f in ("dense", "fp8", "int4")]
        print(f"sanitize: moe_experts H={H} I={I} dense/fp8/int4: {'/'.join(paths)}", flush=True)


if __name__ == "__main__":
    main()
