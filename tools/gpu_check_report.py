"""Which CUDA kernel really runs (tools/gpu_check.sh's first correctness step), as markdown tables:
- block_attention per model (parity / shipped / real heads) and dtype on the default path, and every path forced
  at the real shapes (the op's own report, twotower::cuda_attention_last_launch), each against the fp64 reference;
- moe_experts with fp8 / int4 weights at the real H / I (8 experts): the grouped GEMM kernel (cuda_moe_path) and
  bit-identity with the same op on the dequantised weights;
- the MoE plan of this GPU at the real model's shapes (cuda_moe_plan): route, tiles, bytes in flight per SM.
Exits 1 if any result is wrong."""
import os
import sys

import torch

import twotower_ext as tt
from twotower_ext import quant

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
MOE_PLAN = ["path", "chunk_tokens", "chunks", "workspace_bytes", "fused_route", "launches", "bm", "stages", "k_tile",
            "gemm_smem", "route_smem", "ctas_per_sm", "up_in_flight", "down_in_flight"]


def attention(g) -> int:
    def run(Hq, Hkv, D, dtype, causal=False):
        B, S, lens = 2, 16, [1500, 7]
        q, kb, vb = (torch.randn(B, S, h, D, generator=g).to(dtype).cuda() for h in (Hq, Hkv, Hkv))
        kc, vc = (torch.randn(B, 1600, Hkv, D, generator=g).to(dtype).cuda() for _ in range(2))
        ctx = torch.tensor(lens, dtype=torch.int32).cuda()
        out, _ = tt.block_attention(q, kb, vb, kc, vc, ctx, causal=causal)
        want, _ = tt.reference.block_attention(q.cpu().double(), kb.cpu().double(), vb.cpu().double(),
                                               kc.cpu().double(), vc.cpu().double(), ctx.cpu(), causal=causal)
        err = (out.cpu().double() - want).abs().max().item()
        return torch.ops.twotower.cuda_attention_last_launch(), err, "ok" if err <= TOL[dtype] else "WRONG"

    bad = 0
    print("| attention path | model, dtype | kernel that ran (cuda_attention_last_launch) | vs fp64 |")
    print("|---|---|---|---|")
    for model, (Hq, Hkv, D) in {"parity": (4, 2, 16), "shipped": (4, 2, 40), "real": (32, 2, 128)}.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:
                ran, err, verdict = run(Hq, Hkv, D, dtype)
                bad += verdict != "ok"
                print(f"| default | {model} (head_dim {D}) {str(dtype)[6:]} | {ran} | {verdict}, max err {err:.2g} |")
            except Exception as e:  # noqa: BLE001
                bad += 1
                print(f"| default | {model} (head_dim {D}) {str(dtype)[6:]} | FAILED: {str(e).splitlines()[0]} | |")
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for path in ("simt", "mma", "wgmma"):
        os.environ["TWOTOWER_ATTN_PATH"] = path
        for causal in (False, True):
            try:
                ran, err, verdict = run(32, 2, 128, torch.bfloat16, causal)
                bad += verdict != "ok"
                print(f"| forced {path} | real bf16 causal={causal} | {ran} | {verdict}, max err {err:.2g} |")
            except Exception as e:  # noqa: BLE001
                bad += path != "wgmma" or (hopper and bool(tt.build_info()["cutlass"]))  # wgmma may refuse elsewhere
                print(f"| forced {path} | real bf16 causal={causal} | REFUSED/FAILED: {str(e).splitlines()[0]} | |")
    os.environ.pop("TWOTOWER_ATTN_PATH", None)
    return bad


def quantised_moe(g) -> int:
    bad = 0
    T, E, k, H, I = 16, 8, 2, 2688, 1856
    up, down = torch.randn(E, I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
    w = torch.rand(T, k, generator=g).cuda()
    print()
    print("| moe weights | x dtype | grouped GEMM kernel (cuda_moe_path) | vs the op on dequantised weights |")
    print("|---|---|---|---|")
    for fmt in ("fp8", "int4"):
        qu, qd = quant.quantize(up, fmt).to("cuda"), quant.quantize(down, fmt).to("cuda")
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            try:
                x = torch.randn(T, H, generator=g).to(dtype).cuda()
                y = torch.ops.twotower.moe_experts(x, ids, w, qu.data, qd.data, qu.scale, qd.scale, qu.group)
                dense = tt.ops.moe_experts(x, ids, w, quant.dequantize(qu, dtype), quant.dequantize(qd, dtype))
                same = torch.equal(y, dense)
                bad += not same
                ran = torch.ops.twotower.cuda_moe_path(dtype, fmt, H, I, qu.group, scale_dtype=qu.scale.dtype)
                print(f"| {fmt} | {str(dtype)[6:]} | {ran} | {'bit-identical' if same else 'DIFFERENT'}, max |y| "
                      f"{y.abs().max().item():.3g} |")
            except Exception as e:  # noqa: BLE001
                bad += 1
                print(f"| {fmt} | {str(dtype)[6:]} | FAILED: {str(e).splitlines()[0]} | |")
    return bad


def moe_plan(g) -> int:
    props = torch.cuda.get_device_properties()
    major, minor = torch.cuda.get_device_capability()
    print()
    print(f"| MoE plan on this GPU ({props.multi_processor_count} SMs), real shapes, bf16 x | T | route | launches "
          "| A rows x stages x k tile | smem | CTAs/SM | KiB in flight per SM (up / down) | chunks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt in ("dense", "fp8", "int4"):
        for T in (1, 16, 256, 32768):
            v = dict(zip(MOE_PLAN, torch.ops.twotower.cuda_moe_plan(
                torch.bfloat16, fmt, 2688, 1856, 128, 6, T, 128 if fmt == "int4" else 0, 10 * major + minor,
                props.multi_processor_count, smem_optin=getattr(props, "shared_memory_per_block_optin", 0),
                smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", 0))))
            print(f"| {fmt} | {T} | {'fused' if v['fused_route'] else 'kernel'} | {int(v['launches'])} | "
                  f"{int(v['bm'])} x {int(v['stages'])} x {int(v['k_tile'])} | {int(v['gemm_smem'] + v['route_smem'])} | "
                  f"{int(v['ctas_per_sm'])} | {v['up_in_flight'] / 1024:.0f} / {v['down_in_flight'] / 1024:.0f} | "
                  f"{int(v['chunks'])} x {int(v['chunk_tokens'])} |")
    return 0


def main() -> int:
    g = torch.Generator().manual_seed(0)
    bad = 0
    for section in (attention, quantised_moe, moe_plan):  # one failing section does not hide the others
        try:
            bad += section(g) or 0
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"\n| {section.__name__} | FAILED: {str(e).splitlines()[0]} |\n|---|---|")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
