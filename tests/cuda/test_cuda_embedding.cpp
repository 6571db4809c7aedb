// Embedding CUDA kernels against the CPU reference: forward is an exact copy; backward (sorted,
// deterministic) on random, heavily repeated and all-same token ids, for f32, bf16 and f16.
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cpu/embedding.hpp"
#include "kernels/cuda/embedding.cuh"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

template <typename T>
class CudaEmbedding : public ::testing::Test {};
using longtune::test::StorageTypes;
TYPED_TEST_SUITE(CudaEmbedding, StorageTypes, DtypeName);

enum class Tokens { Uniform, FewIds, AllSame, Runs };

struct Case {
  int64_t T, C, V;
  Tokens tokens;
};
const Case kCases[] = {
    {1, 8, 5, Tokens::Uniform},        {777, 1001, 97, Tokens::Uniform},  {2048, 2048, 4096, Tokens::Uniform},
    {3000, 3072, 7, Tokens::FewIds},   {1500, 4096, 1000, Tokens::Runs},  {4096, 2048, 50, Tokens::AllSame},
    {333, 5, 3, Tokens::FewIds},       {2999, 2048, 20, Tokens::Runs},
};

std::vector<int32_t> make_tokens(const Case& c, std::mt19937& rng) {
  std::vector<int32_t> t(size_t(c.T));
  std::uniform_int_distribution<int32_t> id(0, int32_t(c.V - 1));
  switch (c.tokens) {
    case Tokens::Uniform:
      for (auto& x : t) x = id(rng);
      break;
    case Tokens::FewIds:  // a handful of ids, each repeated hundreds of times
      for (auto& x : t) x = id(rng) % 4 == 0 ? int32_t(c.V - 1) : id(rng) % std::min<int32_t>(int32_t(c.V), 7);
      break;
    case Tokens::AllSame:
      std::fill(t.begin(), t.end(), int32_t(c.V / 2));
      break;
    case Tokens::Runs: {  // long runs of one id (crossing the kernel's chunk boundaries), ids revisited
      std::uniform_int_distribution<int> run(1, 300);
      for (size_t i = 0; i < t.size();) {
        const int32_t v = id(rng);
        for (int r = run(rng); r > 0 && i < t.size(); --r) t[i++] = v;
      }
      break;
    }
  }
  return t;
}

std::string trace(const Case& c) {
  return "T=" + std::to_string(c.T) + " C=" + std::to_string(c.C) + " V=" + std::to_string(c.V) +
         " tokens=" + std::to_string(int(c.tokens));
}

}  // namespace

TYPED_TEST(CudaEmbedding, ForwardCopiesRows) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  for (const Case& c : kCases) {
    SCOPED_TRACE(trace(c));
    const auto tokens = make_tokens(c, rng);
    const auto wte = round_to_dtype<T>(random_vector(size_t(c.V * c.C), rng));
    std::vector<float> out(size_t(c.T * c.C));
    cpu::embedding_forward(out.data(), tokens.data(), wte.data(), c.T, c.C);
    DeviceBuffer<int32_t> d_tok(tokens);
    DeviceBuffer<T> d_wte(to_device_dtype<T>(wte)), d_out(out.size());
    poison_nan(d_out.get(), out.size());
    cuda::embedding_forward(d_out.get(), d_tok.get(), d_wte.get(), c.T, c.C, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bit_equal(d_out.download(), to_device_dtype<T>(out)));
  }
}

TYPED_TEST(CudaEmbedding, BackwardMatchesCpuAndIsDeterministic) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  for (const Case& c : kCases) {
    SCOPED_TRACE(trace(c));
    const auto tokens = make_tokens(c, rng);
    const auto dout = round_to_dtype<T>(random_vector(size_t(c.T * c.C), rng));
    const auto dwte0 = random_vector(size_t(c.V * c.C), rng);  // dwte accumulates
    std::vector<float> dwte(dwte0);
    cpu::embedding_backward(dwte.data(), dout.data(), tokens.data(), c.T, c.C);

    DeviceBuffer<int32_t> d_tok(tokens);
    DeviceBuffer<T> d_dout(to_device_dtype<T>(dout));
    DeviceBuffer<float> d_dwte(dwte0);
    DeviceBuffer<char> scratch(cuda::embedding_backward_scratch_bytes(c.T));
    poison_nan(scratch.get(), cuda::embedding_backward_scratch_bytes(c.T));
    cuda::embedding_backward(d_dwte.get(), d_dout.get(), d_tok.get(), c.T, c.C, scratch.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto first = d_dwte.download();
    // Only the touched rows change, summed in fp32 per chunk and in double across chunks.
    EXPECT_LT(rel_error(first, dwte), 1e-6);
    double max_rel_row = 0;
    for (int64_t v = 0; v < c.V; ++v) {
      double num = 0, den = 0;
      for (int64_t j = 0; j < c.C; ++j) {
        const size_t i = size_t(v * c.C + j);
        num += (double(first[i]) - dwte[i]) * (double(first[i]) - dwte[i]);
        den += double(dwte[i] - dwte0[i]) * double(dwte[i] - dwte0[i]) + 1e-30;
      }
      max_rel_row = std::max(max_rel_row, std::sqrt(num / den));
    }
    EXPECT_LT(max_rel_row, 1e-5) << "worst row: |gpu - cpu| / |cpu update|";

    d_dwte.upload(dwte0);
    cuda::embedding_backward(d_dwte.get(), d_dout.get(), d_tok.get(), c.T, c.C, scratch.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bit_equal(d_dwte.download(), first));
  }
}
