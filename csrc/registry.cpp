// The op schemas, all in one place (each op's checks, plan and CPU / CUDA registrations sit next to its
// kernel in csrc/<op>/<op>_torch.cpp; kernel code below csrc/<op>/ is torch-free), and the Python module.
#include <Python.h>
#include <torch/library.h>

// ---------------------------------------------------------------------------------------------------
// Registry: schemas first, then one registration block per dispatch key.

TORCH_LIBRARY(twotower, m) {
  m.def("block_attention(Tensor q, Tensor k_blk, Tensor v_blk, Tensor k_ctx, Tensor v_ctx, Tensor ctx_lens, "
        "float? scale=None, bool causal=False) -> (Tensor, Tensor)");
  m.def("block_attention_out(Tensor q, Tensor k_blk, Tensor v_blk, Tensor k_ctx, Tensor v_ctx, Tensor ctx_lens, "
        "float? scale, Tensor(a!) out, bool causal=False) -> Tensor");
  m.def("merge_states(Tensor o, Tensor lse) -> (Tensor, Tensor)");
  // Host-side views of the CUDA attention (no tensors, no GPU needed): the plan a shape gets on a given GPU, and
  // what the last CUDA block_attention call of this thread launched.
  m.def("cuda_attention_plan(int batch, int block_len, int q_heads, int kv_heads, int head_dim, int ctx_capacity, "
        "str dtype, int cc, int num_sms, str path='', int ctx_len=-1, int smem_optin=0, int smem_per_sm=0, "
        "bool sm90a_image=True) -> int[]");
  m.def("cuda_attention_last_launch() -> str");
  m.def("threshold_unmask(Tensor logits, Tensor(a!) x, int mask_id, Tensor gamma, Tensor step, Tensor steps_per_block, "
        "Tensor temperature, Tensor seed, Tensor block, Tensor? kept, Tensor(b!) counts, Tensor(c!) done, "
        "Tensor(d!)? logprob) -> ()");
  // The denoiser's LM head fused with threshold_unmask (CPU; csrc/lm_head_unmask/lm_head_unmask.h): the commit step
  // on hidden @ w^T (w packed as for linear, n = vocab) without materialising the logits unless logits_out is given.
  m.def("lm_head_unmask(Tensor hidden, Tensor w, int n, Tensor(a!) x, int mask_id, Tensor gamma, Tensor step, "
        "Tensor steps_per_block, Tensor temperature, Tensor seed, Tensor block, Tensor? kept, Tensor(b!) counts, "
        "Tensor(c!) done, Tensor(d!)? logprob, Tensor(e!)? logits_out) -> ()");
  m.def("mamba_block_scan(Tensor xBC, Tensor dt, Tensor conv_state, Tensor ssm_state, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor dt_bias, Tensor A_log, Tensor D, Tensor? seq_lens, float dt_min, float dt_max, "
        "Tensor(a!)? conv_state_out, Tensor(b!)? ssm_state_out) -> Tensor");
  // Quantised experts: w_up / w_down float8_e4m3fn (fp8, per-channel fp32 scales) or uint8 (int4 packed, group
  // scales, group_size > 0); see csrc/moe/moe.h.
  // shared_up / shared_down (CPU): the layer's shared expert (packed linears, shared_inter hidden), fused.
  m.def("moe_experts(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor w_up, Tensor w_down, "
        "Tensor? w_up_scale=None, Tensor? w_down_scale=None, int group_size=0, Tensor? shared_up=None, "
        "Tensor? shared_down=None, int shared_inter=0) -> Tensor");
  m.def("moe_experts_out(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor w_up, Tensor w_down, "
        "Tensor(a!) out, Tensor? w_up_scale=None, Tensor? w_down_scale=None, int group_size=0, "
        "Tensor? shared_up=None, Tensor? shared_down=None, int shared_inter=0) -> ()");
  // The MoE router (CPU; csrc/moe_router/moe_router.h): fp64 sigmoid scores, grouped top-k selection by score + bias
  // with torch.topk's tie order, renormalised weights. -> (ids [T, k] int64, weights [T, k] fp64).
  m.def("moe_route(Tensor x, Tensor router, Tensor bias, int k, int n_group=1, int topk_group=1, "
        "bool norm_topk_prob=True, float scaling=1.0) -> (Tensor, Tensor)");
  // The layers' RMSNorms (CPU; csrc/norm/norm.h): the RMSNorm with the denoiser's modulation before
  // (modulate_first) or after it, optionally after the residual add x + gate * add (then also returning that sum);
  // Mamba-2's grouped z-gated RMSNorm.
  m.def("rms_norm(Tensor x, Tensor w, float eps, Tensor? shift=None, Tensor? scale=None, bool modulate_first=False) "
        "-> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor add, Tensor? gate, Tensor w, float eps, Tensor? shift=None, "
        "Tensor? scale=None, bool modulate_first=False) -> (Tensor, Tensor)");
  m.def("gated_rms_norm(Tensor y, Tensor z, Tensor w, int group, float eps) -> Tensor");
  // Dense linear on packed weights (CPU; csrc/linear/linear.h): y [..., n] = x [..., K] @ W^T.
  m.def("linear(Tensor x, Tensor w, int n) -> Tensor");
  // Host-side view of its plan (no tensors): "micro:<isa>" or "library" for these sizes.
  m.def("linear_cpu_plan(int m, int n, int k, ScalarType dtype, str isa, int threads) -> str");
  // A tower's layers in one call (CPU; csrc/tower/tower_torch.cpp): the ops above, in models/towers.py's order, over
  // the layer table of models/tower_program.py. states: the cache tensors it reads and (write) advances in place.
  m.def("tower_layers(Tensor x, Tensor h, Tensor?[] weights, int[] ints, float[] floats, Tensor(a!)[] states, "
        "Tensor attn_lens, Tensor? seq_lens, Tensor? kv_index, Tensor? kv_keep, Tensor? modulation, int row0, "
        "bool write) -> (Tensor, Tensor)");
  // Host-side view of the CUDA MoE (no tensors, no GPU needed): the grouped-GEMM kernel a call would get.
  // The CPU instruction-set levels this CPU runs (common/cpu_isa.h), lowest first: the values TWOTOWER_CPU_ISA takes.
  m.def("cpu_isas() -> str[]");
  m.def("cuda_moe_path(ScalarType dtype, str format, int hidden, int inter, int group_size=0, "
        "ScalarType? scale_dtype=None, int[] strides=[], int pointer_offset=0) -> str");
  // ... and the rest of its plan for a call of `tokens` tokens on a GPU (compute capability, SM count).
  m.def("cuda_moe_plan(ScalarType dtype, str format, int hidden, int inter, int experts, int topk, int tokens, "
        "int group_size=0, int cc=90, int num_sms=132, int smem_optin=0, int smem_per_sm=0) -> float[]");
}

// A plain module: the ops register themselves with the dispatcher when the library is loaded, so this
// needs no libtorch_python and builds against the stable ABI (one _C.abi3.so for every CPython >= 3.9).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "twotower_ext kernels (ops live in torch.ops.twotower)",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
