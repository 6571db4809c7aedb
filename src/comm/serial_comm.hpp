// SerialComm: the one-process communicator. Rank 0 of 1; collectives are copies or no-ops. It
// validates its arguments like MpiComm does, so single-rank tests catch the same misuse.
#pragma once
#include "src/comm/comm.hpp"

namespace longtune {

class SerialComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string backend() const override { return "serial"; }

  void barrier() override {}
  void broadcast(void* data, size_t bytes, int root) override;

  void all_reduce_sum(double* data, size_t count) override;
  void all_reduce_sum(float* data, size_t count) override;
  void all_reduce_sum(int64_t* data, size_t count) override;
  void all_reduce_max(double* data, size_t count) override;

  void all_gather_v(float* full, const float* mine, const std::vector<int64_t>& counts) override;
  void reduce_scatter_v(float* mine, const float* full, const std::vector<int64_t>& counts) override;
};

}  // namespace longtune
