#include "src/train/device_engine.hpp"

#include "src/common/error.hpp"

namespace longtune {

#if !LONGTUNE_HAVE_CUDA
// CPU-only build: src/gpu is not compiled.
std::unique_ptr<DeviceEngine> make_device_engine(const TrainConfig& cfg, const LlamaConfig&, const ParamTable&) {
  throw ConfigError("--device " + cfg.device + ": expected cpu, this longtune was built without CUDA");
}
#endif

}  // namespace longtune
