// A tower's layers on the CPU as one op: the per-layer sequence of ops that models/towers.py writes in Python
// (its CPU decode loop), called from C++ through the dispatcher.
//
// Why: on the CPU a decode pass is ~250 ops of 5-200 us. From Python each costs the interpreter, the op's boxing
// and the autograd fallback (~3-5 us, plus ~1 us per view or slice between them); at 2 threads that glue was ~45%
// of a width-1/8 AR step's main thread, with the helper thread idle through it. CUDA removes the same cost with
// graphs; the CPU has none, so the loop itself moves here. It composes the very ops the Python loop calls, with
// the same arguments in the same order, so its result is bit for bit the Python loop's (tests/test_tower_layers.py).
// The loop stays the definition (CUDA, the reference, prefill run it): a change to a layer's math goes into both.
//
// The layer table (weights, ints, floats) is built once per tower by models/tower_program.py, which also
// documents it; `states` holds each layer's cache tensors (whole, all rows; this op takes rows [row0, row0 + n)).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/torch_checks.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Layer kinds: the codes of models/tower_program.py's layout (keep the two in step).
enum Kind : int64_t { kMamba = 0, kAttention = 1, kMoe = 2, kMlp = 3 };

// The schemas of csrc/registry.cpp as C++ signatures (mutable / optional tensors: const std::optional<Tensor>&).
using LinearSig = Tensor(const Tensor&, const Tensor&, int64_t);
using ScanSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                       const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, double, const OptTensor&,
                       const OptTensor&);
using GatedNormSig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double);
using AddNormSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, double,
                                              const OptTensor&, const OptTensor&, bool);
using AttentionSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, std::optional<double>, bool);
using RouteSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                                            bool, double);
using ExpertsSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const OptTensor&, int64_t, const OptTensor&, const OptTensor&, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<LinearSig> linear = op<LinearSig>("twotower::linear");
  c10::TypedOperatorHandle<ScanSig> scan = op<ScanSig>("twotower::mamba_block_scan");
  c10::TypedOperatorHandle<GatedNormSig> gated_norm = op<GatedNormSig>("twotower::gated_rms_norm");
  c10::TypedOperatorHandle<AddNormSig> add_norm = op<AddNormSig>("twotower::add_rms_norm");
  c10::TypedOperatorHandle<AttentionSig> attention = op<AttentionSig>("twotower::block_attention");
  c10::TypedOperatorHandle<RouteSig> route = op<RouteSig>("twotower::moe_route");
  c10::TypedOperatorHandle<ExpertsSig> experts = op<ExpertsSig>("twotower::moe_experts");
};

const Ops& ops() {
  static const Ops o;  // looked up once: the schemas are registered when the library loads
  return o;
}

// Sequential readers over the layer table, checking that it holds what each layer asks for.
struct Table {
  const c10::List<OptTensor>& w;
  c10::ArrayRef<int64_t> ints;
  c10::ArrayRef<double> floats;
  int64_t wi = 0, ii = 0, fi = 0;

  OptTensor opt() {
    TORCH_CHECK(wi < int64_t(w.size()), "twotower: tower_layers: weights end at entry ", wi, " of the layer table");
    return w.get(wi++);
  }
  Tensor tensor() {
    OptTensor t = opt();
    TORCH_CHECK(t.has_value(), "twotower: tower_layers: weights[", wi - 1, "] must be a tensor, got None");
    return *t;
  }
  int64_t i() {
    TORCH_CHECK(ii < int64_t(ints.size()), "twotower: tower_layers: ints end at entry ", ii, " of the layer table");
    return ints[ii++];
  }
  double f() {
    TORCH_CHECK(fi < int64_t(floats.size()), "twotower: tower_layers: floats end at entry ", fi,
                " of the layer table");
    return floats[fi++];
  }
};

// The rows [row0, row0 + n) of a whole cache tensor (a view: the op writes states in place).
Tensor rows_of(const Tensor& t, int64_t row0, int64_t n) {
  TORCH_CHECK(t.dim() >= 1 && row0 >= 0 && row0 + n <= t.size(0), "twotower: tower_layers: rows [", row0, ", ",
              row0 + n, ") are outside a state of shape ", t.sizes());
  return row0 == 0 && n == t.size(0) ? t : t.narrow(0, row0, n);  // every row (a batch of one): no view to make
}

// CacheStore.write_kv (models/cache.py) for one layer: val [n, L, Hkv, D] into the flattened token axis of `store`
// at `index` [n * L]; where `keep` ([n * L, 1, 1] bool) is False a position keeps what it holds.
void write_kv(const Tensor& store, const Tensor& val, const Tensor& index, const OptTensor& keep) {
  Tensor tokens = store.view({-1, store.size(2), store.size(3)});
  Tensor v = val.reshape({-1, store.size(2), store.size(3)});
  if (keep.has_value()) v = at::where(*keep, v, tokens.index_select(0, index));
  tokens.index_copy_(0, index, v);
}

std::tuple<Tensor, Tensor> tower_layers_cpu(const Tensor& x_in, const Tensor& h_in,
                                            const c10::List<OptTensor>& weights, c10::ArrayRef<int64_t> ints,
                                            c10::ArrayRef<double> floats, at::TensorList states,
                                            const Tensor& attn_lens, const OptTensor& seq_lens,
                                            const OptTensor& kv_index, const OptTensor& kv_keep,
                                            const OptTensor& modulation, int64_t row0, bool write) {
  // Straight to the CPU kernels: none of these calls is recorded for autograd (the Python loop runs under no_grad).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& o = ops();
  TORCH_CHECK(x_in.dim() == 3 && h_in.sizes() == x_in.sizes(), "twotower: tower_layers: x and h must be [rows, "
              "tokens, hidden] of one shape, got ", x_in.sizes(), " and ", h_in.sizes());
  const int64_t n = x_in.size(0), L = x_in.size(1);
  Table t{weights, ints, floats};
  const int64_t layers = t.i();
  const double eps = t.f();
  TORCH_CHECK(!modulation.has_value() || (modulation->dim() == 4 && modulation->size(1) == layers &&
                                         modulation->size(2) == 3),
              "twotower: tower_layers: modulation must be [rows, ", layers, ", 3, hidden]");
  // (shift, scale, gate) of layer i: views of the modulation, as towers.py unbinds it (one unbind per layer, where a
  // select per view cost ~0.3 ms of dispatch a denoiser pass).
  std::vector<std::vector<Tensor>> mods;
  if (modulation.has_value())
    for (const Tensor& m : modulation->unbind(1)) mods.push_back(m.unbind(1));
  auto mod = [&](int64_t i, int64_t j) -> OptTensor {
    if (!modulation.has_value() || i >= layers) return std::nullopt;
    return mods[i][j];
  };
  Tensor x = x_in, h = h_in;
  int64_t si = 0;  // next entry of states
  auto state = [&]() -> const Tensor& {
    TORCH_CHECK(si < int64_t(states.size()), "twotower: tower_layers: states end at entry ", si);
    return states[si++];
  };
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t kind = t.i();
    const bool first_next = t.i() != 0;
    Tensor out;
    if (kind == kMamba) {
      const Tensor in_proj = t.tensor(), out_proj = t.tensor(), conv_w = t.tensor();
      const OptTensor conv_b = t.opt();
      const Tensor dt_bias = t.tensor(), A_log = t.tensor(), D = t.tensor(), norm = t.tensor();
      const int64_t in_n = t.i(), out_n = t.i(), d_inner = t.i(), conv_dim = t.i(), heads = t.i(), group = t.i();
      const double dt_min = t.f(), dt_max = t.f();
      const Tensor conv = rows_of(state(), row0, n), ssm = rows_of(state(), row0, n);
      const Tensor proj = o.linear.call(h, in_proj, in_n);
      const Tensor z = proj.narrow(-1, 0, d_inner), xbc = proj.narrow(-1, d_inner, conv_dim),
                   dt = proj.narrow(-1, d_inner + conv_dim, heads);
      const OptTensor conv_out = write ? OptTensor(conv) : std::nullopt;
      const OptTensor ssm_out = write ? OptTensor(ssm) : std::nullopt;
      Tensor y = o.scan.call(xbc, dt, conv, ssm, conv_w, conv_b, dt_bias, A_log, D, seq_lens, dt_min, dt_max,
                             conv_out, ssm_out);
      y = o.gated_norm.call(y, z, norm, group, eps);
      out = o.linear.call(y, out_proj, out_n);
    } else if (kind == kAttention) {
      const Tensor wq = t.tensor(), wk = t.tensor(), wv = t.tensor(), wo = t.tensor();
      const int64_t qn = t.i(), kn = t.i(), vn = t.i(), on = t.i(), heads = t.i(), kv_heads = t.i(), dim = t.i();
      const double scale = t.f();
      const Tensor& k_store = state();
      const Tensor& v_store = state();
      const Tensor q = o.linear.call(h, wq, qn).view({n, L, heads, dim});
      const Tensor k = o.linear.call(h, wk, kn).view({n, L, kv_heads, dim});
      const Tensor v = o.linear.call(h, wv, vn).view({n, L, kv_heads, dim});
      if (write) {
        TORCH_CHECK(kv_index.has_value(), "twotower: tower_layers: write needs kv_index (layer ", i, " is attention)");
        write_kv(k_store, k, *kv_index, kv_keep);
        write_kv(v_store, v, *kv_index, kv_keep);
      }
      const Tensor a = std::get<0>(o.attention.call(q, k, v, rows_of(k_store, row0, n), rows_of(v_store, row0, n),
                                                    attn_lens, scale, write));
      out = o.linear.call(a.reshape({n, L, -1}), wo, on);
    } else if (kind == kMoe) {
      const Tensor router = t.tensor(), bias = t.tensor(), up = t.tensor(), down = t.tensor();
      const OptTensor up_scale = t.opt(), down_scale = t.opt();
      const Tensor shared_up = t.tensor(), shared_down = t.tensor();
      const int64_t k = t.i(), n_group = t.i(), topk_group = t.i(), renorm = t.i(), group_size = t.i(),
                    shared_inter = t.i();
      const double scaling = t.f();
      const Tensor x2 = h.reshape({-1, h.size(-1)});
      auto [ids, wts] = o.route.call(x2, router, bias, k, n_group, topk_group, renorm != 0, scaling);
      out = o.experts.call(x2, ids, wts, up, down, up_scale, down_scale, group_size, shared_up, shared_down,
                           shared_inter).view(h.sizes());
    } else if (kind == kMlp) {
      const Tensor up = t.tensor(), down = t.tensor();
      const int64_t up_n = t.i(), down_n = t.i();
      out = o.linear.call(at::square(at::relu(o.linear.call(h, up, up_n))), down, down_n);
    } else {
      TORCH_CHECK(false, "twotower: tower_layers: layer ", i, " has kind ", kind, ", expected 0-3 (models/"
                  "tower_program.py)");
    }
    // The residual add (gated) and the next layer's norm in one; the last layer: the final norm, or (the context
    // tower, whose final norm runs on the last token only) the plain add, returning the layer's output beside it.
    const OptTensor next_norm = t.opt();
    if (next_norm.has_value()) {
      std::tie(h, x) = o.add_norm.call(x, out, mod(i, 2), *next_norm, eps, mod(i + 1, 0), mod(i + 1, 1), first_next);
    } else {
      TORCH_CHECK(i + 1 == layers, "twotower: tower_layers: only the last layer may have no next norm");
      x = at::add(x, out);
      h = out;
    }
  }
  TORCH_CHECK(t.wi == int64_t(weights.size()) && t.ii == int64_t(ints.size()) && t.fi == int64_t(floats.size()) &&
                  si == int64_t(states.size()),
              "twotower: tower_layers: the layer table has entries left over (weights ", t.wi, "/", weights.size(),
              ", ints ", t.ii, "/", ints.size(), ", floats ", t.fi, "/", floats.size(), ", states ", si, "/",
              states.size(), ")");
  return {h, x};
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("tower_layers", &tower_layers_cpu); }
