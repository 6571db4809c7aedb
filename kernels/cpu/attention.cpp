#include "kernels/cpu/attention.hpp"

#include <cmath>
#include <vector>

#include "src/common/error.hpp"

namespace longtune::cpu {

namespace {

void check_shapes(const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                  int64_t HD) {
  LT_CHECK(NH > 0 && NKV > 0 && HD > 0, "attention: NH, NKV and HD must be positive");
  LT_CHECK(NH % NKV == 0, "attention: NH must be a multiple of NKV");
  LT_CHECK(num_segments >= 0, "attention: negative number of segments");
  LT_CHECK(cu_seqlens[0] == 0, "attention: cu_seqlens must start at 0");
  for (int64_t s = 0; s < num_segments; ++s)
    LT_CHECK(cu_seqlens[s] <= cu_seqlens[s + 1], "attention: cu_seqlens must be non-decreasing");
  LT_CHECK(cu_seqlens[num_segments] == T, "attention: cu_seqlens must end at T");
}

// seg_start[i] = first token of the segment holding token i.
std::vector<int64_t> segment_starts(const int32_t* cu_seqlens, int64_t num_segments, int64_t T) {
  std::vector<int64_t> start(static_cast<size_t>(T));
  for (int64_t s = 0; s < num_segments; ++s)
    for (int64_t i = cu_seqlens[s]; i < cu_seqlens[s + 1]; ++i) start[i] = cu_seqlens[s];
  return start;
}

// seg_end[j] = one past the last token of the segment holding token j.
std::vector<int64_t> segment_ends(const int32_t* cu_seqlens, int64_t num_segments, int64_t T) {
  std::vector<int64_t> end(static_cast<size_t>(T));
  for (int64_t s = 0; s < num_segments; ++s)
    for (int64_t j = cu_seqlens[s]; j < cu_seqlens[s + 1]; ++j) end[j] = cu_seqlens[s + 1];
  return end;
}

double dot(const float* a, const float* b, int64_t n) {
  double acc = 0.0;
  for (int64_t d = 0; d < n; ++d) acc += static_cast<double>(a[d]) * b[d];
  return acc;
}

}  // namespace

// For query token i, head h (kv head g = h / (NH / NKV)), keys j in [seg_start(i), i]:
//   s_ij = scale * q_i . k_j ;  lse_i = log sum_j exp(s_ij) ;  p_ij = exp(s_ij - lse_i) ;
//   out_i = sum_j p_ij v_j.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HD) {
  check_shapes(cu_seqlens, num_segments, T, NH, NKV, HD);
  const std::vector<int64_t> seg_start = segment_starts(cu_seqlens, num_segments, T);
  const int64_t group = NH / NKV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));

#pragma omp parallel
  {
    std::vector<double> score, acc(static_cast<size_t>(HD));
#pragma omp for schedule(dynamic)
    for (int64_t ih = 0; ih < T * NH; ++ih) {
      const int64_t i = ih / NH, h = ih % NH, g = h / group;
      const int64_t j0 = seg_start[i];
      const float* qi = q + (i * NH + h) * HD;
      score.assign(static_cast<size_t>(i - j0 + 1), 0.0);
      double mx = -INFINITY;
      for (int64_t j = j0; j <= i; ++j) {
        score[j - j0] = scale * dot(qi, k + (j * NKV + g) * HD, HD);
        mx = std::fmax(mx, score[j - j0]);
      }
      double sum = 0.0;
      for (int64_t j = j0; j <= i; ++j) sum += std::exp(score[j - j0] - mx);
      const double l = mx + std::log(sum);
      lse[i * NH + h] = static_cast<float>(l);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = j0; j <= i; ++j) {
        const double p = std::exp(score[j - j0] - l);
        const float* vj = v + (j * NKV + g) * HD;
        for (int64_t d = 0; d < HD; ++d) acc[d] += p * vj[d];
      }
      float* oi = out + (i * NH + h) * HD;
      for (int64_t d = 0; d < HD; ++d) oi[d] = static_cast<float>(acc[d]);
    }
  }
}

// With p_ij recomputed from the saved lse, dp_ij = dout_i . v_j, D_i = dout_i . out_i:
//   ds_ij = p_ij (dp_ij - D_i)
//   dq_i = scale sum_j ds_ij k_j ;  dk_j = scale sum_{h in group, i} ds_ij q_i ;  dv_j = sum_{h, i} p_ij dout_i
// dq is computed per (i, h), dk and dv per (j, kv head), each summing over its own indices in a
// fixed order: every output element is written once (assigned), deterministically.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* cu_seqlens,
                        int64_t num_segments, int64_t T, int64_t NH, int64_t NKV, int64_t HD) {
  check_shapes(cu_seqlens, num_segments, T, NH, NKV, HD);
  const std::vector<int64_t> seg_start = segment_starts(cu_seqlens, num_segments, T);
  const std::vector<int64_t> seg_end = segment_ends(cu_seqlens, num_segments, T);
  const int64_t group = NH / NKV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));

  std::vector<double> D(static_cast<size_t>(T * NH));
#pragma omp parallel for schedule(static)
  for (int64_t ih = 0; ih < T * NH; ++ih) D[ih] = dot(dout + ih * HD, out + ih * HD, HD);

  // dq
#pragma omp parallel
  {
    std::vector<double> acc(static_cast<size_t>(HD));
#pragma omp for schedule(dynamic)
    for (int64_t ih = 0; ih < T * NH; ++ih) {
      const int64_t i = ih / NH, h = ih % NH, g = h / group;
      const float* qi = q + ih * HD;
      const float* doi = dout + ih * HD;
      const double l = lse[ih];
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = seg_start[i]; j <= i; ++j) {
        const float* kj = k + (j * NKV + g) * HD;
        const float* vj = v + (j * NKV + g) * HD;
        const double p = std::exp(scale * dot(qi, kj, HD) - l);
        const double ds = p * (dot(doi, vj, HD) - D[ih]);
        for (int64_t d = 0; d < HD; ++d) acc[d] += ds * kj[d];
      }
      float* dqi = dq + ih * HD;
      for (int64_t d = 0; d < HD; ++d) dqi[d] = static_cast<float>(scale * acc[d]);
    }
  }

  // dk, dv
#pragma omp parallel
  {
    std::vector<double> acck(static_cast<size_t>(HD)), accv(static_cast<size_t>(HD));
#pragma omp for schedule(dynamic)
    for (int64_t jg = 0; jg < T * NKV; ++jg) {
      const int64_t j = jg / NKV, g = jg % NKV;
      const float* kj = k + jg * HD;
      const float* vj = v + jg * HD;
      std::fill(acck.begin(), acck.end(), 0.0);
      std::fill(accv.begin(), accv.end(), 0.0);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i = j; i < seg_end[j]; ++i) {
          const int64_t ih = i * NH + h;
          const float* qi = q + ih * HD;
          const float* doi = dout + ih * HD;
          const double p = std::exp(scale * dot(qi, kj, HD) - static_cast<double>(lse[ih]));
          const double ds = p * (dot(doi, vj, HD) - D[ih]);
          for (int64_t d = 0; d < HD; ++d) {
            acck[d] += ds * qi[d];
            accv[d] += p * doi[d];
          }
        }
      }
      float* dkj = dk + jg * HD;
      float* dvj = dv + jg * HD;
      for (int64_t d = 0; d < HD; ++d) {
        dkj[d] = static_cast<float>(scale * acck[d]);
        dvj[d] = static_cast<float>(accv[d]);
      }
    }
  }
}

}  // namespace longtune::cpu
