// cuDNN fused flash attention through the backend API. See attention_cudnn.cuh.
#include "kernels/cuda/attention_cudnn.cuh"

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_check.cuh"
#include "src/common/error.hpp"

#if LONGTUNE_HAVE_CUDNN
#include <cudnn_graph.h>
#endif

namespace longtune::cuda {

#if !LONGTUNE_HAVE_CUDNN

std::string cudnn_attention_unavailable_reason() { return "this build has no cuDNN (install cuDNN 9 and rebuild)"; }

namespace attn_detail {
void cudnn_attention_forward(CudnnDtype, void*, float*, const void*, const void*, const void*, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, cudaStream_t) {
  throw ConfigError("attention: " + cudnn_attention_unavailable_reason());
}
void cudnn_attention_backward(CudnnDtype, void*, void*, void*, const void*, const void*, const void*, const void*,
                              const void*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, void*, cudaStream_t) {
  throw ConfigError("attention: " + cudnn_attention_unavailable_reason());
}
}  // namespace attn_detail

#else

namespace {

[[noreturn]] void throw_cudnn_error(cudnnStatus_t st, const char* call, const char* file, int line) {
  char last[1024] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  throw CudaError(std::string("cuDNN call failed: ") + call + " at " + file + ":" + std::to_string(line) + ": " +
                  cudnnGetErrorString(st) + (last[0] ? std::string(" (") + last + ")" : std::string()));
}

#define CUDNN_CHECK(call)                                                           \
  do {                                                                              \
    const cudnnStatus_t lt_st_ = (call);                                            \
    if (lt_st_ != CUDNN_STATUS_SUCCESS) throw_cudnn_error(lt_st_, #call, __FILE__, __LINE__); \
  } while (0)

bool verbose() {
  static const bool v = [] {
    const char* e = std::getenv("LONGTUNE_CUDNN_VERBOSE");
    return e && *e && *e != '0';
  }();
  return v;
}

// One backend descriptor, destroyed with its owner.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) { CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_)); }
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }

  void set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count, const void* values) {
    CUDNN_CHECK(cudnnBackendSetAttribute(d_, name, type, count, values));
  }
  void set_desc(cudnnBackendAttributeName_t name, const Desc& other) {
    cudnnBackendDescriptor_t o = other.get();
    set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &o);
  }
  void set_int(cudnnBackendAttributeName_t name, int64_t v) { set(name, CUDNN_TYPE_INT64, 1, &v); }
  void set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t v) { set(name, CUDNN_TYPE_DATA_TYPE, 1, &v); }
  void finalize() { CUDNN_CHECK(cudnnBackendFinalize(d_)); }
  cudnnStatus_t try_finalize() { return cudnnBackendFinalize(d_); }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

using Dims = std::array<int64_t, 4>;

// An operation graph under construction: tensors by uid, operations in order.
class GraphBuilder {
 public:
  // Non-virtual tensors take the caller's uid; virtual ones are numbered from kFirstVirtual.
  static constexpr int64_t kFirstVirtual = 1000;

  const Desc& tensor(int64_t uid, cudnnDataType_t dt, Dims dims, Dims strides, bool is_virtual = false,
                     bool by_value = false) {
    auto t = std::make_unique<Desc>(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t->set_int(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid);
    t->set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, dt);
    t->set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    t->set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    t->set_int(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16);
    t->set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) t->set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    t->finalize();
    descs_.push_back(std::move(t));
    return *descs_.back();
  }
  const Desc& virt(cudnnDataType_t dt, Dims dims, Dims strides) {
    return tensor(next_virtual_++, dt, dims, strides, true);
  }
  const Desc& scalar(int64_t uid) { return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true); }

  // y = mode(x [, b [, t]]): b second operand, t the selector of BINARY_SELECT.
  void pointwise(cudnnPointwiseMode_t mode, const Desc& y, const Desc& x, const Desc* b = nullptr,
                 const Desc* t = nullptr, cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    auto pw = std::make_unique<Desc>(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw->set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    pw->set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
    if (axis >= 0) pw->set_int(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw->finalize();
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, *pw);
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t) op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    op->set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    op->finalize();
    descs_.push_back(std::move(pw));
    add_op(std::move(op));
  }
  void reduction(cudnnReduceTensorOp_t mode, const Desc& y, const Desc& x) {
    auto red = std::make_unique<Desc>(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    red->set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode);
    red->set_dtype(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT);
    red->finalize();
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    op->set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    op->set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, *red);
    op->finalize();
    descs_.push_back(std::move(red));
    add_op(std::move(op));
  }
  // c = a @ b over the last two dimensions, batched (and broadcast) over the first two.
  void matmul(const Desc& c, const Desc& a, const Desc& b) {
    auto mm = std::make_unique<Desc>(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm->set_dtype(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT);
    mm->finalize();
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, *mm);
    op->finalize();
    descs_.push_back(std::move(mm));
    add_op(std::move(op));
  }
  // y = x seen through other dimensions / strides (a transpose here).
  void reshape(const Desc& y, const Desc& x) {
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    op->set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    op->finalize();
    add_op(std::move(op));
  }

  // The finalized graph, its fastest plan that finalizes, and the plan's workspace size.
  struct Built {
    std::unique_ptr<Desc> graph, plan;
    int64_t workspace = 0;
    std::vector<std::unique_ptr<Desc>> keep;  // tensors and ops the plan refers to
  };
  Built build(cudnnHandle_t handle, const char* what) {
    Built out;
    out.graph = std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    std::vector<cudnnBackendDescriptor_t> ops;
    for (const Desc* d : ops_) ops.push_back(d->get());
    out.graph->set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(ops.size()), ops.data());
    out.graph->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    out.graph->finalize();

    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, *out.graph);
    cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    heur.set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    heur.finalize();
    constexpr int kMaxConfigs = 16;
    std::vector<std::unique_ptr<Desc>> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int i = 0; i < kMaxConfigs; ++i) {
      cfgs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw.push_back(cfgs.back()->get());
    }
    int64_t count = 0;
    CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                         kMaxConfigs, &count, raw.data()));
    if (verbose()) std::fprintf(stderr, "[cudnn attention] %s: %lld engine configs\n", what, (long long)count);
    std::string last_error;
    for (int64_t i = 0; i < count; ++i) {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
      plan->set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *cfgs[size_t(i)]);
      const cudnnStatus_t st = plan->try_finalize();
      if (st != CUDNN_STATUS_SUCCESS) {
        char msg[1024] = {0};
        cudnnGetLastErrorString(msg, sizeof(msg));
        last_error = std::string(cudnnGetErrorString(st)) + (msg[0] ? std::string(": ") + msg : std::string());
        if (verbose()) std::fprintf(stderr, "[cudnn attention] %s: config %lld: %s\n", what, (long long)i,
                                    last_error.c_str());
        continue;
      }
      int64_t ws = 0, n = 0;
      CUDNN_CHECK(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64,
                                           1, &n, &ws));
      if (verbose())
        std::fprintf(stderr, "[cudnn attention] %s: config %lld finalized, workspace %lld bytes\n", what,
                     (long long)i, (long long)ws);
      out.plan = std::move(plan);
      out.workspace = ws;
      out.keep = std::move(descs_);
      for (auto& c : cfgs) out.keep.push_back(std::move(c));
      return out;
    }
    throw ConfigError(std::string("attention: cuDNN has no engine for the ") + what + " graph (" +
                      std::to_string(count) + " candidates" + (last_error.empty() ? "" : "; last: " + last_error) +
                      "); run with --attention tensor-core");
  }

 private:
  void add_op(std::unique_ptr<Desc> op) {
    ops_.push_back(op.get());
    descs_.push_back(std::move(op));
  }
  std::vector<std::unique_ptr<Desc>> descs_;
  std::vector<const Desc*> ops_;
  int64_t next_virtual_ = kFirstVirtual;
};

// Uids of the tensors the caller binds at execution.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kOne, kDO, kDQ, kDK, kDV, kSoftmaxSum, kDQAccum
};

cudnnDataType_t io_type(attn_detail::CudnnDtype dt) {
  return dt == attn_detail::CudnnDtype::kBf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF;
}

struct Shape {
  bool backward;
  attn_detail::CudnnDtype dt;
  int64_t T, NH, NKV, HD, ldq, ldk, ldv;
  int device;
  auto key() const { return std::tie(backward, dt, T, NH, NKV, HD, ldq, ldk, ldv, device); }
  bool operator<(const Shape& o) const { return key() < o.key(); }
};

// Token-major layouts of the packed stream, as cuDNN (batch, head, seq, dim) views.
Dims rows(int64_t T, int64_t H, int64_t D, int64_t ld) { (void)H; return {T * ld, D, ld, 1}; }
Dims rows_t(int64_t T, int64_t ld, int64_t D) { (void)D; return {T * ld, D, 1, ld}; }  // (b, h, d, s)
// lse (T, NH) fp32: stats (1, NH, T, 1) with head stride 1.
Dims stats_strides(int64_t T, int64_t NH) { return {T * NH, 1, NH, 1}; }

// Causal mask: keep score (row i, col j) when i >= j, else -inf.
const Desc& causal_mask(GraphBuilder& g, const Desc& s, const Desc& neg_inf, Dims dims, Dims strides) {
  const Desc& row = g.virt(CUDNN_DATA_INT32, dims, strides);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, row, s, nullptr, nullptr, CUDNN_DATA_FLOAT, 2);
  const Desc& col = g.virt(CUDNN_DATA_INT32, dims, strides);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, col, s, nullptr, nullptr, CUDNN_DATA_FLOAT, 3);
  const Desc& keep = g.virt(CUDNN_DATA_BOOLEAN, dims, strides);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, keep, row, &col, nullptr, CUDNN_DATA_BOOLEAN);
  const Desc& masked = g.virt(CUDNN_DATA_FLOAT, dims, strides);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, masked, s, &neg_inf, &keep);
  return masked;
}

GraphBuilder::Built build_forward(cudnnHandle_t h, const Shape& sh) {
  const int64_t T = sh.T, NH = sh.NH, NKV = sh.NKV, HD = sh.HD;
  const cudnnDataType_t io = io_type(sh.dt);
  GraphBuilder g;
  const Desc& q = g.tensor(kQ, io, {1, NH, T, HD}, rows(T, NH, HD, sh.ldq));
  const Desc& kt = g.tensor(kK, io, {1, NKV, HD, T}, rows_t(T, sh.ldk, HD));
  const Desc& v = g.tensor(kV, io, {1, NKV, T, HD}, rows(T, NKV, HD, sh.ldv));
  const Desc& o = g.tensor(kO, io, {1, NH, T, HD}, rows(T, NH, HD, NH * HD));
  const Desc& stats = g.tensor(kStats, CUDNN_DATA_FLOAT, {1, NH, T, 1}, stats_strides(T, NH));
  const Desc& scale = g.scalar(kScale);
  const Desc& neg_inf = g.scalar(kNegInf);

  const Dims sd{1, NH, T, T}, ss{NH * T * T, T * T, T, 1};
  const Dims rd{1, NH, T, 1}, rs{NH * T, T, 1, 1};
  const Desc& s = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(s, q, kt);
  const Desc& s_scaled = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, s_scaled, s, &scale);
  const Desc& s_masked = causal_mask(g, s_scaled, neg_inf, sd, ss);
  const Desc& row_max = g.virt(CUDNN_DATA_FLOAT, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, row_max, s_masked);
  const Desc& centered = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, centered, s_masked, &row_max);
  const Desc& e = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, e, centered);
  const Desc& row_sum = g.virt(CUDNN_DATA_FLOAT, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, row_sum, e);
  const Desc& log_sum = g.virt(CUDNN_DATA_FLOAT, rd, rs);
  g.pointwise(CUDNN_POINTWISE_LOG, log_sum, row_sum);
  g.pointwise(CUDNN_POINTWISE_ADD, stats, row_max, &log_sum);
  const Desc& p = g.virt(io, sd, ss);
  g.pointwise(CUDNN_POINTWISE_DIV, p, e, &row_sum);
  g.matmul(o, p, v);
  return g.build(h, "forward");
}

GraphBuilder::Built build_backward(cudnnHandle_t h, const Shape& sh) {
  const int64_t T = sh.T, NH = sh.NH, NKV = sh.NKV, HD = sh.HD;
  const cudnnDataType_t io = io_type(sh.dt);
  GraphBuilder g;
  const Desc& q = g.tensor(kQ, io, {1, NH, T, HD}, rows(T, NH, HD, sh.ldq));
  const Desc& kt = g.tensor(kK, io, {1, NKV, HD, T}, rows_t(T, sh.ldk, HD));
  const Desc& vt = g.tensor(kV, io, {1, NKV, HD, T}, rows_t(T, sh.ldv, HD));
  const Desc& o = g.tensor(kO, io, {1, NH, T, HD}, rows(T, NH, HD, NH * HD));
  const Desc& d_o = g.tensor(kDO, io, {1, NH, T, HD}, rows(T, NH, HD, NH * HD));
  const Desc& stats = g.tensor(kStats, CUDNN_DATA_FLOAT, {1, NH, T, 1}, stats_strides(T, NH));
  const Desc& dq = g.tensor(kDQ, io, {1, NH, T, HD}, rows(T, NH, HD, sh.ldq));
  const Desc& dk = g.tensor(kDK, io, {1, NKV, T, HD}, rows(T, NKV, HD, sh.ldk));
  const Desc& dv = g.tensor(kDV, io, {1, NKV, T, HD}, rows(T, NKV, HD, sh.ldv));
  const Desc& scale = g.scalar(kScale);
  const Desc& neg_inf = g.scalar(kNegInf);
  const Desc& one = g.scalar(kOne);

  const Dims sd{1, NH, T, T}, ss{NH * T * T, T * T, T, 1};
  const Dims st_strides{NH * T * T, T * T, 1, T};  // the (kv, q) transpose of a score tensor
  const Dims rd{1, NH, T, 1}, rs{NH * T, T, 1, 1};
  const Dims hd{1, NH, T, HD}, hs{NH * T * HD, T * HD, HD, 1};

  // D_i = sum_d dO_id O_id (written to the workspace: the engine reads it per key tile).
  const Desc& prod = g.virt(CUDNN_DATA_FLOAT, hd, {NH * T * HD, T * HD, NH * HD, 1});
  g.pointwise(CUDNN_POINTWISE_MUL, prod, d_o, &o);
  const Desc& prod_sum = g.virt(CUDNN_DATA_FLOAT, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, prod_sum, prod);
  const Desc& softmax_sum = g.tensor(kSoftmaxSum, CUDNN_DATA_FLOAT, rd, rs);
  g.pointwise(CUDNN_POINTWISE_MUL, softmax_sum, prod_sum, &one);

  // P = exp(scale * Q K^T - lse), causal.
  const Desc& s = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(s, q, kt);
  const Desc& s_scaled = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, s_scaled, s, &scale);
  const Desc& s_centered = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, s_centered, s_scaled, &stats);
  const Desc& s_masked = causal_mask(g, s_centered, neg_inf, sd, ss);
  const Desc& p = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, p, s_masked);

  // dV = P^T dO (summed over the query heads of each kv head).
  const Desc& pt = g.virt(io, sd, st_strides);
  g.reshape(pt, p);
  if (NH == NKV) {
    g.matmul(dv, pt, d_o);
  } else {
    const Desc& dv_heads = g.virt(io, hd, hs);
    g.matmul(dv_heads, pt, d_o);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dv, dv_heads);
  }

  // dS = scale * P * (dO V^T - D).
  const Desc& dp = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(dp, d_o, vt);
  const Desc& dp_centered = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, dp_centered, dp, &softmax_sum);
  const Desc& dp_p = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, dp_p, dp_centered, &p);
  const Desc& ds = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, ds, dp_p, &scale);

  // dK = dS^T Q (summed over the query heads of each kv head).
  const Desc& dst = g.virt(io, sd, st_strides);
  g.reshape(dst, ds);
  if (NH == NKV) {
    g.matmul(dk, dst, q);
  } else {
    const Desc& dk_heads = g.virt(io, hd, hs);
    g.matmul(dk_heads, dst, q);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dk, dk_heads);
  }

  // dQ = dS K, accumulated in fp32 and converted.
  const Desc& k = g.virt(io, {1, NKV, T, HD}, rows(T, NKV, HD, sh.ldk));
  g.reshape(k, kt);
  const Desc& dq_accum = g.tensor(kDQAccum, CUDNN_DATA_FLOAT, hd, hs);
  g.matmul(dq_accum, ds, k);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq, dq_accum);
  return g.build(h, "backward");
}

// Per device: a handle, the plans by shape, and a scratch buffer for plan workspaces.
struct DeviceState {
  cudnnHandle_t handle = nullptr;
  std::map<Shape, GraphBuilder::Built> plans;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
};

std::mutex g_mutex;
std::map<int, DeviceState>& states() {
  static std::map<int, DeviceState> s;  // handles and buffers live until exit
  return s;
}

struct PlanRef {
  const GraphBuilder::Built* built;
  cudnnHandle_t handle;
  void* scratch;
};

PlanRef plan_for(const Shape& sh) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState& ds = states()[sh.device];
  if (!ds.handle) CUDNN_CHECK(cudnnCreate(&ds.handle));
  auto it = ds.plans.find(sh);
  if (it == ds.plans.end()) {
    GraphBuilder::Built b = sh.backward ? build_backward(ds.handle, sh) : build_forward(ds.handle, sh);
    if (size_t(b.workspace) > ds.scratch_bytes) {
      if (ds.scratch) CUDA_CHECK(cudaFree(ds.scratch));
      ds.scratch = nullptr;
      CUDA_CHECK(cudaMalloc(&ds.scratch, size_t(b.workspace)));
      ds.scratch_bytes = size_t(b.workspace);
    }
    it = ds.plans.emplace(sh, std::move(b)).first;
  }
  return {&it->second, ds.handle, ds.scratch};
}

void execute(const PlanRef& plan, const std::vector<int64_t>& uids, const std::vector<void*>& ptrs,
             cudaStream_t stream) {
  CUDNN_CHECK(cudnnSetStream(plan.handle, stream));
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, int64_t(uids.size()), uids.data());
  pack.set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()), ptrs.data());
  void* ws = plan.scratch;
  pack.set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
  pack.finalize();
  CUDNN_CHECK(cudnnBackendExecute(plan.handle, plan.built->plan->get(), pack.get()));
}

int current_device() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

std::string cudnn_attention_unavailable_reason() {
  const size_t version = cudnnGetVersion();
  if (version < 90000) return "cuDNN " + std::to_string(version) + " is older than 9.0";
  int dev = current_device(), major = 0, minor = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major < 8)
    return "cuDNN fused attention needs sm_80 or newer; this GPU is sm_" + std::to_string(major * 10 + minor);
  return "";
}

namespace attn_detail {

void cudnn_attention_forward(CudnnDtype dt, void* out, float* lse, const void* q, const void* k, const void* v,
                             int64_t T, int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk,
                             int64_t ldv, cudaStream_t stream) {
  const PlanRef plan = plan_for({false, dt, T, NH, NKV, HD, ldq, ldk, ldv, current_device()});
  float scale = float(1.0 / std::sqrt(double(HD)));
  float neg_inf = -std::numeric_limits<float>::infinity();
  execute(plan, {kQ, kK, kV, kO, kStats, kScale, kNegInf},
          {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), out, lse, &scale, &neg_inf}, stream);
}

void cudnn_attention_backward(CudnnDtype dt, void* dq, void* dk, void* dv, const void* dout, const void* q,
                              const void* k, const void* v, const void* out, const float* lse, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk, int64_t ldv,
                              void* workspace, cudaStream_t stream) {
  const PlanRef plan = plan_for({true, dt, T, NH, NKV, HD, ldq, ldk, ldv, current_device()});
  auto* softmax_sum = static_cast<float*>(workspace);
  auto* dq_accum = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(size_t(T) * NH * 4));
  CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, size_t(T) * size_t(NH) * size_t(HD) * 4, stream));
  float scale = float(1.0 / std::sqrt(double(HD)));
  float neg_inf = -std::numeric_limits<float>::infinity();
  float one = 1.0f;
  execute(plan, {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kScale, kNegInf, kOne, kSoftmaxSum, kDQAccum},
          {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), const_cast<void*>(out),
           const_cast<void*>(dout), const_cast<float*>(lse), dq, dk, dv, &scale, &neg_inf, &one, softmax_sum,
           dq_accum},
          stream);
}

}  // namespace attn_detail

#endif  // LONGTUNE_HAVE_CUDNN

}  // namespace longtune::cuda
