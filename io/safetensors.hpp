// Safetensors reading and writing: single files and sharded directories
// (model.safetensors.index.json). Format: u64 little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "src/common/dtype.hpp"

namespace longtune {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range, relative to the start of the data section
  int64_t numel() const;
};

// One .safetensors file. The header is parsed and fully validated on open (offsets in range and
// consistent with dtype x shape, no overlaps, file not truncated); data is read on demand.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::string path);
  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr when absent
  // Raw bytes of a tensor (dtype as stored) into dst (numel * dtype_size bytes).
  void read_raw(const TensorInfo& t, void* dst) const;
  // Tensor converted to fp32 (floating dtypes only).
  void read_f32(const TensorInfo& t, float* dst) const;
  // Elements [first, first + count) of the tensor in row-major order, converted to fp32: only
  // those bytes are read. The dtype is checked even when count is 0.
  void read_f32(const TensorInfo& t, int64_t first, int64_t count, float* dst) const;

 private:
  std::string path_;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A model directory: model.safetensors, or shards listed by model.safetensors.index.json.
class SafetensorsDir {
 public:
  explicit SafetensorsDir(std::string dir);
  const std::string& dir() const { return dir_; }
  // nullptr when no file holds `name`.
  const TensorInfo* find(const std::string& name, const SafetensorsFile** file = nullptr) const;
  std::vector<std::string> names() const;
  // Reads `name` as fp32 into dst after checking its shape equals `shape`; throws InputError
  // naming the file and tensor when it is missing, mis-shaped or of a non-floating dtype.
  void read_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst) const;
  // The same checks, then only elements [first, first + count) (row-major) into dst; with count 0
  // nothing is read, so it validates the tensor without I/O.
  void read_f32(const std::string& name, const std::vector<int64_t>& shape, int64_t first, int64_t count,
                float* dst) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
};

// A tensor to write: fp32 data converted to `dtype` (F32, F16, BF16 or F64) on the way out.
struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
  DType dtype = DType::BF16;
};

// Writes one .safetensors file atomically (temporary name, fsync, rename).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});
// Writes `dir`/model.safetensors when everything fits in max_shard_bytes, else
// model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json.
void write_safetensors_dir(const std::string& dir, const std::vector<TensorToWrite>& tensors,
                           uint64_t max_shard_bytes = uint64_t(5) << 30);

}  // namespace longtune
