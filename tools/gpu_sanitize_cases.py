"""Small calls of each CUDA kernel, for compute-sanitizer (tools/gpu_check.sh runs every set under memcheck and the
attention and MoE sets under racecheck). Inputs are made on the CPU and copied, so the sanitizer sees almost only
this project's kernels. Each call prints a `sanitize:` line (for attention: the kernel that really ran).

  python tools/gpu_sanitize_cases.py [--cases all|attention,merge,unmask,mamba,moe] [--list]

attention: every path this GPU has (simt, mma, wgmma on sm_90 with a build that has it): a row with one split
  (direct write) and a causal row with several (merge); the model's heads at B = 1 over a 1K context (a wave of
  splits: 4 row blocks x many splits, then the merge); a batch that fills the SMs (128-row CTAs, no merge).
merge, mamba: merge_states, mamba_block_scan once each. unmask: threshold_unmask with numbers, with per-row values
  (one row's gamma out of range, kept past S) and logprob, and as the AR step uses it (mask -1).
moe: dense, fp8 and int4 expert weights on the mma path (aligned sizes) and the SIMT one (odd sizes) with the route
  fused into the up GEMM (few slots), the route in its own launch (many slots), and a prefill long enough to be
  cut into two chunks (moe_cuda_plan.h)."""
import argparse
import math
import os
import sys

import torch

import twotower_ext as tt
from twotower_ext import quant

SETS = ["attention", "merge", "unmask", "mamba", "moe"]
DEV = "cuda"


def attention_cases(g):
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # wgmma: on sm_90 with a build that has it (--list on a machine without a GPU: as on an H100)
    sm90 = torch.cuda.get_device_capability() == (9, 0) if torch.cuda.is_available() else True
    hopper = sm90 and bool(tt.build_info()["cutlass"])
    cases = []
    for path in ["simt", "mma"] + (["wgmma"] if hopper else []):
        for causal, B, Hq, lens, L in ((False, 2, 8, [300, 0], 2200), (True, 2, 8, [2100, 5], 2200),
                                       (True, 1, 32, [1024], 1100)):
            cases.append((f"block_attention {path} causal={causal} B={B} q_heads={Hq} lens={lens}", path,
                          (B, 16, Hq, 2, 128, L, lens, causal)))
    sms = torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 132
    B = -(-sms // 4)
    cases.append((f"block_attention default B={B} (128-row CTAs, one split)", "", (B, 16, 32, 2, 128, 64, [40] * B, True)))

    def run(path, shape):
        B, S, Hq, Hkv, D, L, lens, causal = shape
        if path:
            os.environ["TWOTOWER_ATTN_PATH"] = path
        else:
            os.environ.pop("TWOTOWER_ATTN_PATH", None)
        q, kb, vb = (rnd(B, S, h, D).bfloat16().to(DEV) for h in (Hq, Hkv, Hkv))
        kc, vc = (rnd(B, L, Hkv, D).bfloat16().to(DEV) for _ in range(2))
        ctx = torch.tensor(lens, dtype=torch.int32).to(DEV)
        tt.block_attention(q, kb, vb, kc, vc, ctx, causal=causal)
        return torch.ops.twotower.cuda_attention_last_launch()

    return [(name, lambda path=path, shape=shape: run(path, shape)) for name, path, shape in cases]


def merge_cases(g):
    def run():
        o, lse = torch.randn(3, 5, 64, generator=g).to(DEV), torch.randn(3, 5, generator=g).to(DEV)
        lse[1, 2] = -math.inf
        tt.merge_states(o, lse)
    return [("merge_states", run)]


def unmask_cases(g):
    MASK, V = 7, 300
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32).to(DEV)  # noqa: E731

    def scalars():
        tt.threshold_unmask(rnd(2, 16, V), torch.full((2, 16), MASK, dtype=torch.int64).to(DEV), MASK, 0.5, 3, 8,
                            0.9, 11, 5)

    def per_row():  # row 2: gamma out of range, left untouched; kept past S, clamped; logprob
        tt.threshold_unmask(rnd(3, 16, V), torch.full((3, 16), MASK, dtype=torch.int64).to(DEV), MASK,
                            torch.tensor([0.5, 0.9, 1.5]).to(DEV), i32(0, 7, 1), i32(4, 8, 2),
                            torch.tensor([0.0, 0.7, 1.0]).to(DEV), torch.tensor([1, -2, 3]).to(DEV),
                            torch.tensor([0, 2**40, 5]).to(DEV), i32(16, 5, 20),
                            out_logprob=torch.zeros(3, 16, device=DEV))

    def ar():  # AR use (mask -1)
        tt.threshold_unmask(rnd(3, 1, V), torch.full((3, 1), -1, dtype=torch.int64).to(DEV), -1, 0.9, 0, 1,
                            torch.tensor([0.0, 0.8, 1.2]).to(DEV), 11, torch.tensor([4, 5, 6]).to(DEV))
    return [("threshold_unmask", scalars), ("threshold_unmask per-row values, logprob", per_row),
            ("threshold_unmask AR use (mask -1)", ar)]


def mamba_cases(g):
    def run():
        rnd = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
        B, Lt, H, P, N, G, K = 2, 16, 4, 16, 16, 1, 4
        C = H * P + 2 * G * N
        xbc, dt = rnd(B, Lt, C), rnd(B, Lt, H)
        conv, ssm = rnd(B, K - 1, C), rnd(B, H, P, N)
        tt.mamba_block_scan(xbc, dt, conv, ssm, rnd(C, K), rnd(C), rnd(H), rnd(H).abs(), rnd(H),
                            torch.tensor([16, 9], dtype=torch.int32).to(DEV), conv_state_out=conv, ssm_state_out=ssm)
    return [("mamba_block_scan", run)]


def moe_cases(g):
    def run(T, E, k, H, I, formats):
        x = torch.randn(T, H, generator=g).bfloat16().to(DEV)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEV)
        wts = torch.rand(T, k, generator=g).to(DEV)
        up, down = torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / I ** 0.5
        paths = []
        for fmt in formats:
            group = 0
            if fmt == "dense":
                tt.ops.moe_experts(x, ids, wts, up.bfloat16().to(DEV), down.bfloat16().to(DEV))
            else:
                qu, qd = (quant.quantize(w, fmt).to(DEV) for w in (up, down))
                torch.ops.twotower.moe_experts(x, ids, wts, qu.data, qd.data, qu.scale, qd.scale, qu.group)
                group = qu.group
            plan = torch.ops.twotower.cuda_moe_plan(torch.bfloat16, fmt, H, I, E, k, T, group)
            paths.append(f"{fmt}: {torch.ops.twotower.cuda_moe_path(torch.bfloat16, fmt, H, I, group)}"
                         f" route {'fused' if plan[4] else 'kernel'}, {int(plan[2])} chunk(s)")
        return "; ".join(paths)

    shapes = [("few slots, aligned", (6, 4, 2, 160, 96)), ("few slots, odd sizes", (6, 4, 2, 53, 37)),
              ("many slots, aligned", (300, 8, 2, 64, 32)), ("prefill in two chunks", (4100, 4, 2, 64, 32))]
    return [(f"moe_experts {name} T={s[0]} E={s[1]} k={s[2]} H={s[3]} I={s[4]}",
             lambda s=s: run(*s, ("dense", "fp8", "int4"))) for name, s in shapes]


CASES = {"attention": attention_cases, "merge": merge_cases, "unmask": unmask_cases, "mamba": mamba_cases,
         "moe": moe_cases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="all", help="all, or a comma-separated list of: " + ", ".join(SETS))
    ap.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = ap.parse_args(argv)
    sets = SETS if args.cases == "all" else args.cases.split(",")
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        print(f"twotower: --cases takes all or {', '.join(SETS)}, got {', '.join(unknown)}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    for s in sets:
        for name, run in CASES[s](g):
            if args.list:
                print(name)
                continue
            ran = run()
            torch.cuda.synchronize()
            print(f"sanitize: {name}{': ' + ran if ran else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
