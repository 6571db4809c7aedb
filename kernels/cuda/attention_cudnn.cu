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
void cudnn_attention_forward(CudnnDtype, void*, float*, const void*, const void*, const void*, const int32_t*,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             cudaStream_t) {
  throw ConfigError("attention: " + cudnn_attention_unavailable_reason());
}
void cudnn_attention_backward(CudnnDtype, void*, void*, void*, const void*, const void*, const void*, const void*,
                              const void*, const float*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, int64_t, int64_t, void*, cudaStream_t) {
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
                     bool by_value = false, const Desc* ragged_offset = nullptr) {
    auto t = std::make_unique<Desc>(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t->set_int(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid);
    t->set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, dt);
    t->set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    t->set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    t->set_int(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16);
    t->set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) t->set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    if (ragged_offset) t->set_desc(CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC, *ragged_offset);
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
  // c = a @ b over the last two dimensions, batched (and broadcast) over the first two; the
  // overrides (per batch entry) shrink M, N or K to a segment's length.
  void matmul(const Desc& c, const Desc& a, const Desc& b, const Desc* m_override = nullptr,
              const Desc* n_override = nullptr, const Desc* k_override = nullptr) {
    auto mm = std::make_unique<Desc>(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm->set_dtype(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT);
    mm->finalize();
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, *mm);
    if (m_override) op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, *m_override);
    if (n_override) op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, *n_override);
    if (k_override) op->set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, *k_override);
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
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kOne, kDO, kDQ, kDK, kDV, kSoftmaxSum, kDQAccum,
  kSeqLen, kOffQ, kOffK, kOffV, kOffO, kOffStats
};

cudnnDataType_t io_type(attn_detail::CudnnDtype dt) {
  return dt == attn_detail::CudnnDtype::kBf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF;
}

// A plan's shape. One segment: B = 1, S = T, dense views. Packed documents: B segments (padded to
// a power of two with empty ones) of at most S tokens (a power of two), ragged offsets into the
// token stream, a padding mask, and the GEMM sizes overridden per segment.
struct Shape {
  bool backward;
  attn_detail::CudnnDtype dt;
  int64_t T, NH, NKV, HD, ldq, ldk, ldv;
  int64_t B, S;
  int device;
  bool ragged() const { return B > 1 || S != T; }
  auto key() const { return std::tie(backward, dt, T, NH, NKV, HD, ldq, ldk, ldv, B, S, device); }
  bool operator<(const Shape& o) const { return key() < o.key(); }
};

// The (batch, head, seq, dim) views of the token-major stream, ragged or dense.
class Views {
 public:
  Views(GraphBuilder& g, const Shape& sh) : g_(g), sh_(sh) {
    if (!sh.ragged()) return;
    const Dims one{1, 1, 1, 1};
    seq_len_ = &g.tensor(kSeqLen, CUDNN_DATA_INT32, {sh.B, 1, 1, 1}, one);
    for (int64_t uid : {kOffQ, kOffK, kOffV, kOffO, kOffStats})
      offsets_.push_back(&g.tensor(uid, CUDNN_DATA_INT32, {sh.B + 1, 1, 1, 1}, one));
  }
  const Desc* seq_len() const { return seq_len_; }
  // (B, H, S, HD) rows of stride ld; transposed: (B, H, HD, S).
  const Desc& rows(int64_t uid, cudnnDataType_t dt, int64_t H, int64_t ld, int64_t off_uid, bool transposed = false) {
    const int64_t B = sh_.B, S = sh_.S, HD = sh_.HD;
    const Dims dims = transposed ? Dims{B, H, HD, S} : Dims{B, H, S, HD};
    const Dims strides = transposed ? Dims{S * ld, HD, 1, ld} : Dims{S * ld, HD, ld, 1};
    return g_.tensor(uid, dt, dims, strides, false, false, offset(off_uid));
  }
  // (B, NH, S, 1) fp32 in the (T, NH) layout of lse.
  const Desc& per_row(int64_t uid) {
    return g_.tensor(uid, CUDNN_DATA_FLOAT, {sh_.B, sh_.NH, sh_.S, 1}, {sh_.S * sh_.NH, 1, sh_.NH, 1}, false, false,
                     offset(kOffStats));
  }

 private:
  const Desc* offset(int64_t uid) const {
    return sh_.ragged() ? offsets_[size_t(uid - kOffQ)] : nullptr;
  }
  GraphBuilder& g_;
  const Shape& sh_;
  const Desc* seq_len_ = nullptr;
  std::vector<const Desc*> offsets_;
};

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

// Padding mask of packed segments: keep (i, j) when both are inside the segment, else -inf.
const Desc& padding_mask(GraphBuilder& g, const Desc& s, const Desc& neg_inf, const Desc& seq_len, Dims dims,
                         Dims strides) {
  const Desc& row = g.virt(CUDNN_DATA_INT32, dims, strides);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, row, s, nullptr, nullptr, CUDNN_DATA_INT32, 2);
  const Desc& col = g.virt(CUDNN_DATA_INT32, dims, strides);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, col, s, nullptr, nullptr, CUDNN_DATA_INT32, 3);
  const Desc& row_in = g.virt(CUDNN_DATA_BOOLEAN, dims, strides);
  g.pointwise(CUDNN_POINTWISE_CMP_LT, row_in, row, &seq_len, nullptr, CUDNN_DATA_BOOLEAN);
  const Desc& col_in = g.virt(CUDNN_DATA_BOOLEAN, dims, strides);
  g.pointwise(CUDNN_POINTWISE_CMP_LT, col_in, col, &seq_len, nullptr, CUDNN_DATA_BOOLEAN);
  const Desc& keep = g.virt(CUDNN_DATA_BOOLEAN, dims, strides);
  g.pointwise(CUDNN_POINTWISE_LOGICAL_AND, keep, row_in, &col_in, nullptr, CUDNN_DATA_BOOLEAN);
  const Desc& masked = g.virt(CUDNN_DATA_FLOAT, dims, strides);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, masked, s, &neg_inf, &keep);
  return masked;
}

GraphBuilder::Built build_forward(cudnnHandle_t h, const Shape& sh) {
  const int64_t B = sh.B, S = sh.S, NH = sh.NH, NKV = sh.NKV, HD = sh.HD;
  const cudnnDataType_t io = io_type(sh.dt);
  GraphBuilder g;
  Views view(g, sh);
  const Desc* len = view.seq_len();  // null for one segment: no overrides, no padding mask
  const Desc& q = view.rows(kQ, io, NH, sh.ldq, kOffQ);
  const Desc& kt = view.rows(kK, io, NKV, sh.ldk, kOffK, true);
  const Desc& v = view.rows(kV, io, NKV, sh.ldv, kOffV);
  const Desc& o = view.rows(kO, io, NH, NH * HD, kOffO);
  const Desc& stats = view.per_row(kStats);
  const Desc& scale = g.scalar(kScale);
  const Desc& neg_inf = g.scalar(kNegInf);

  const Dims sd{B, NH, S, S}, ss{NH * S * S, S * S, S, 1};
  const Dims rd{B, NH, S, 1}, rs{NH * S, S, 1, 1};
  const Desc& s = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(s, q, kt, len, len, nullptr);
  const Desc& s_scaled = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, s_scaled, s, &scale);
  const Desc& s_padded = len ? padding_mask(g, s_scaled, neg_inf, *len, sd, ss) : s_scaled;
  const Desc& s_masked = causal_mask(g, s_padded, neg_inf, sd, ss);
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
  g.matmul(o, p, v, len, nullptr, len);
  return g.build(h, sh.ragged() ? "forward (packed segments)" : "forward");
}

// out (B, NKV, S, HD) = a @ b computed per query head (hd / hs: its (B, NH, S, HD) view), then
// summed over the query heads of each kv head; directly when NH == NKV.
void matmul_summed_over_group(GraphBuilder& g, const Desc& out, const Desc& a, const Desc& b, const Desc* len,
                              cudnnDataType_t io, bool grouped, Dims hd, Dims hs) {
  if (!grouped) {
    g.matmul(out, a, b, len, nullptr, len);
    return;
  }
  const Desc& per_head = g.virt(io, hd, hs);
  g.matmul(per_head, a, b, len, nullptr, len);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, out, per_head);
}

GraphBuilder::Built build_backward(cudnnHandle_t h, const Shape& sh) {
  const int64_t B = sh.B, S = sh.S, NH = sh.NH, NKV = sh.NKV, HD = sh.HD;
  const cudnnDataType_t io = io_type(sh.dt);
  GraphBuilder g;
  Views view(g, sh);
  const Desc* len = view.seq_len();
  const Desc& q = view.rows(kQ, io, NH, sh.ldq, kOffQ);
  const Desc& kt = view.rows(kK, io, NKV, sh.ldk, kOffK, true);
  const Desc& vt = view.rows(kV, io, NKV, sh.ldv, kOffV, true);
  const Desc& o = view.rows(kO, io, NH, NH * HD, kOffO);
  const Desc& d_o = view.rows(kDO, io, NH, NH * HD, kOffO);
  const Desc& stats = view.per_row(kStats);
  const Desc& dq = view.rows(kDQ, io, NH, sh.ldq, kOffQ);
  const Desc& dk = view.rows(kDK, io, NKV, sh.ldk, kOffK);
  const Desc& dv = view.rows(kDV, io, NKV, sh.ldv, kOffV);
  const Desc& scale = g.scalar(kScale);
  const Desc& neg_inf = g.scalar(kNegInf);
  const Desc& one = g.scalar(kOne);

  const Dims sd{B, NH, S, S}, ss{NH * S * S, S * S, S, 1};
  const Dims st_strides{NH * S * S, S * S, 1, S};  // the (kv, q) transpose of a score tensor
  const Dims rd{B, NH, S, 1}, rs{NH * S, S, 1, 1};
  const Dims hd{B, NH, S, HD}, hs{NH * S * HD, S * HD, HD, 1};

  // D_i = sum_d dO_id O_id (written to the workspace, in the layout of lse: the engine reads it
  // per key tile).
  const Desc& prod = g.virt(CUDNN_DATA_FLOAT, hd, {NH * S * HD, S * HD, NH * HD, 1});
  g.pointwise(CUDNN_POINTWISE_MUL, prod, d_o, &o);
  const Desc& prod_sum = g.virt(CUDNN_DATA_FLOAT, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, prod_sum, prod);
  const Desc& softmax_sum = view.per_row(kSoftmaxSum);
  g.pointwise(CUDNN_POINTWISE_MUL, softmax_sum, prod_sum, &one);

  // P = exp(scale * Q K^T - lse), causal (and inside the segment).
  const Desc& s = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(s, q, kt, len, len, nullptr);
  const Desc& s_scaled = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, s_scaled, s, &scale);
  const Desc& s_centered = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, s_centered, s_scaled, &stats);
  const Desc& s_padded = len ? padding_mask(g, s_centered, neg_inf, *len, sd, ss) : s_centered;
  const Desc& s_masked = causal_mask(g, s_padded, neg_inf, sd, ss);
  const Desc& p = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, p, s_masked);

  // dV = P^T dO (summed over the query heads of each kv head).
  const Desc& pt = g.virt(io, sd, st_strides);
  g.reshape(pt, p);
  matmul_summed_over_group(g, dv, pt, d_o, len, io, NH != NKV, hd, hs);

  // dS = scale * P * (dO V^T - D).
  const Desc& dp = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(dp, d_o, vt, len, len, nullptr);
  const Desc& dp_centered = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, dp_centered, dp, &softmax_sum);
  const Desc& dp_p = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, dp_p, dp_centered, &p);
  const Desc& ds = g.virt(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, ds, dp_p, &scale);

  // dK = dS^T Q (summed over the query heads of each kv head).
  const Desc& dst = g.virt(io, sd, st_strides);
  g.reshape(dst, ds);
  matmul_summed_over_group(g, dk, dst, q, len, io, NH != NKV, hd, hs);

  // dQ = dS K, accumulated in fp32 and converted. Token-major; a ragged batch needs the rows and
  // offsets of dq itself (measured: dense rows gave wrong dq when ld_q != NH * HD).
  const Desc& k = g.virt(io, {B, NKV, S, HD}, {S * sh.ldk, HD, sh.ldk, 1});
  g.reshape(k, kt);
  const Desc& dq_accum = sh.ragged() ? view.rows(kDQAccum, CUDNN_DATA_FLOAT, NH, sh.ldq, kOffQ)
                                     : view.rows(kDQAccum, CUDNN_DATA_FLOAT, NH, NH * HD, kOffO);
  g.matmul(dq_accum, ds, k, len, nullptr, len);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq, dq_accum);
  return g.build(h, sh.ragged() ? "backward (packed segments)" : "backward");
}

// Segment lengths and element offsets of each view, from cu_seqlens; segments past num_segments
// (the padding to B) are empty and start at T.
__global__ void fill_ragged_kernel(int32_t* seq_len, int32_t* off, int64_t B, const int32_t* cu_seqlens,
                                   int64_t num_segments, int64_t ldq, int64_t ldk, int64_t ldv, int64_t ldo,
                                   int64_t NH) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b > B) return;
  const int64_t start = cu_seqlens[b < num_segments ? b : num_segments];
  if (b < B) seq_len[b] = b < num_segments ? cu_seqlens[b + 1] - cu_seqlens[b] : 0;
  const int64_t n = B + 1;
  off[b] = int32_t(start * ldq);
  off[n + b] = int32_t(start * ldk);
  off[2 * n + b] = int32_t(start * ldv);
  off[3 * n + b] = int32_t(start * ldo);
  off[4 * n + b] = int32_t(start * NH);
}

// Per device: a handle, the plans by shape, a scratch buffer for plan workspaces, and the
// segment lengths / ragged offsets of packed batches.
struct DeviceState {
  cudnnHandle_t handle = nullptr;
  std::map<Shape, GraphBuilder::Built> plans;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  int32_t* ragged = nullptr;
  int64_t ragged_B = 0;
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
  int32_t* seq_len;  // B entries, then 5 x (B + 1) offsets: q, k, v, dense rows, lse
};

int current_device() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// The plan shape of a call: packed documents are bucketed (segments to a power of two, the
// longest segment to a power of two, at most T) so a run builds a handful of plans.
Shape shape_of(bool backward, attn_detail::CudnnDtype dt, int64_t num_segments, int64_t max_seqlen, int64_t T,
               int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk, int64_t ldv) {
  Shape sh{backward, dt, T, NH, NKV, HD, ldq, ldk, ldv, 1, T, current_device()};
  if (num_segments > 1 || max_seqlen != T) {
    sh.B = next_pow2(num_segments);
    sh.S = std::min(T, next_pow2(max_seqlen));
  }
  return sh;
}

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
  if (sh.ragged() && sh.B > ds.ragged_B) {
    if (ds.ragged) CUDA_CHECK(cudaFree(ds.ragged));
    ds.ragged = nullptr;
    CUDA_CHECK(cudaMalloc(&ds.ragged, size_t(6 * (sh.B + 1)) * sizeof(int32_t)));
    ds.ragged_B = sh.B;
  }
  return {&it->second, ds.handle, ds.scratch, ds.ragged};
}

// Binds the tensors (uid -> pointer) and runs the plan; packed batches first get their segment
// lengths and offsets computed on the stream.
void execute(const PlanRef& plan, const Shape& sh, const int32_t* cu_seqlens, int64_t num_segments,
             std::vector<int64_t> uids, std::vector<void*> ptrs, cudaStream_t stream) {
  if (sh.ragged()) {
    const int64_t n = sh.B + 1;
    int32_t* off = plan.seq_len + sh.B;
    fill_ragged_kernel<<<unsigned((n + 127) / 128), 128, 0, stream>>>(
        plan.seq_len, off, sh.B, cu_seqlens, num_segments, sh.ldq, sh.ldk, sh.ldv, sh.NH * sh.HD, sh.NH);
    CUDA_CHECK_LAUNCH();
    uids.insert(uids.end(), {kSeqLen, kOffQ, kOffK, kOffV, kOffO, kOffStats});
    ptrs.insert(ptrs.end(), {plan.seq_len, off, off + n, off + 2 * n, off + 3 * n, off + 4 * n});
  }
  CUDNN_CHECK(cudnnSetStream(plan.handle, stream));
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, int64_t(uids.size()), uids.data());
  pack.set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()), ptrs.data());
  void* ws = plan.scratch;
  pack.set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
  pack.finalize();
  CUDNN_CHECK(cudnnBackendExecute(plan.handle, plan.built->plan->get(), pack.get()));
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
                             const int32_t* cu_seqlens, int64_t num_segments, int64_t max_seqlen, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk, int64_t ldv,
                             cudaStream_t stream) {
  const Shape sh = shape_of(false, dt, num_segments, max_seqlen, T, NH, NKV, HD, ldq, ldk, ldv);
  const PlanRef plan = plan_for(sh);
  float scale = float(1.0 / std::sqrt(double(HD)));
  float neg_inf = -std::numeric_limits<float>::infinity();
  execute(plan, sh, cu_seqlens, num_segments, {kQ, kK, kV, kO, kStats, kScale, kNegInf},
          {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), out, lse, &scale, &neg_inf}, stream);
}

void cudnn_attention_backward(CudnnDtype dt, void* dq, void* dk, void* dv, const void* dout, const void* q,
                              const void* k, const void* v, const void* out, const float* lse,
                              const int32_t* cu_seqlens, int64_t num_segments, int64_t max_seqlen, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk, int64_t ldv,
                              void* workspace, cudaStream_t stream) {
  const Shape sh = shape_of(true, dt, num_segments, max_seqlen, T, NH, NKV, HD, ldq, ldk, ldv);
  const PlanRef plan = plan_for(sh);
  auto* softmax_sum = static_cast<float*>(workspace);
  auto* dq_accum = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(size_t(T) * NH * 4));
  CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, size_t(T) * size_t(sh.ragged() ? ldq : NH * HD) * 4, stream));
  float scale = float(1.0 / std::sqrt(double(HD)));
  float neg_inf = -std::numeric_limits<float>::infinity();
  float one = 1.0f;
  execute(plan, sh, cu_seqlens, num_segments,
          {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kScale, kNegInf, kOne, kSoftmaxSum, kDQAccum},
          {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), const_cast<void*>(out),
           const_cast<void*>(dout), const_cast<float*>(lse), dq, dk, dv, &scale, &neg_inf, &one, softmax_sum,
           dq_accum},
          stream);
}

}  // namespace attn_detail

#endif  // LONGTUNE_HAVE_CUDNN

}  // namespace longtune::cuda
