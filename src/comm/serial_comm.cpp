#include "src/comm/serial_comm.hpp"

#include <cstring>

#include "src/common/error.hpp"

namespace longtune {

namespace {

// One count for the one rank, not negative; null buffers only for an empty piece.
void check_counts(const std::vector<int64_t>& counts, const char* what) {
  LT_CHECK(counts.size() == 1, std::string(what) + ": expected 1 count (one per rank), got " +
                                   std::to_string(counts.size()));
  LT_CHECK(counts[0] >= 0, std::string(what) + ": negative count " + std::to_string(counts[0]));
}

}  // namespace

void SerialComm::broadcast(void* data, size_t bytes, int root) {
  LT_CHECK(root == 0, "broadcast: root " + std::to_string(root) + " out of range for 1 rank");
  LT_CHECK(data != nullptr || bytes == 0, "broadcast: null buffer");
}

// A sum or max over one rank is the value itself.
void SerialComm::all_reduce_sum(double* data, size_t count) { LT_CHECK(data || count == 0, "null buffer"); }
void SerialComm::all_reduce_sum(float* data, size_t count) { LT_CHECK(data || count == 0, "null buffer"); }
void SerialComm::all_reduce_sum(int64_t* data, size_t count) { LT_CHECK(data || count == 0, "null buffer"); }
void SerialComm::all_reduce_max(double* data, size_t count) { LT_CHECK(data || count == 0, "null buffer"); }

void SerialComm::all_gather_v(float* full, const float* mine, const std::vector<int64_t>& counts) {
  check_counts(counts, "all_gather_v");
  if (counts[0] == 0) return;
  LT_CHECK(full && mine, "all_gather_v: null buffer");
  if (full != mine) std::memmove(full, mine, static_cast<size_t>(counts[0]) * sizeof(float));
}

void SerialComm::reduce_scatter_v(float* mine, const float* full, const std::vector<int64_t>& counts) {
  check_counts(counts, "reduce_scatter_v");
  if (counts[0] == 0) return;
  LT_CHECK(full && mine, "reduce_scatter_v: null buffer");
  if (full != mine) std::memmove(mine, full, static_cast<size_t>(counts[0]) * sizeof(float));
}

}  // namespace longtune
