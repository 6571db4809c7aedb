#include "src/optim/lr_schedule.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "src/common/error.hpp"

namespace longtune {

LrSchedule parse_lr_schedule(const std::string& name) {
  if (name == "constant") return LrSchedule::Constant;
  if (name == "cosine") return LrSchedule::Cosine;
  if (name == "linear") return LrSchedule::Linear;
  throw ConfigError("--lr-schedule: expected constant, cosine or linear, got '" + name + "'");
}

std::string_view lr_schedule_name(LrSchedule s) {
  switch (s) {
    case LrSchedule::Constant: return "constant";
    case LrSchedule::Cosine: return "cosine";
    case LrSchedule::Linear: return "linear";
  }
  return "?";
}

void validate(const ScheduleConfig& cfg) {
  if (!(cfg.base_lr >= 0.0) || !std::isfinite(cfg.base_lr))
    throw ConfigError("--lr: expected a finite value >= 0, got " + std::to_string(cfg.base_lr));
  if (cfg.warmup_steps < 0)
    throw ConfigError("--warmup-steps: expected an integer >= 0, got " + std::to_string(cfg.warmup_steps));
  if (!(cfg.min_lr_ratio >= 0.0 && cfg.min_lr_ratio <= 1.0))
    throw ConfigError("--min-lr-ratio: expected a value in [0, 1], got " + std::to_string(cfg.min_lr_ratio));
  if (cfg.kind != LrSchedule::Constant && cfg.total_steps <= cfg.warmup_steps)
    throw ConfigError("--steps: expected more steps than --warmup-steps (" + std::to_string(cfg.warmup_steps) +
                      ") for the " + std::string(lr_schedule_name(cfg.kind)) + " schedule, got " +
                      std::to_string(cfg.total_steps));
}

double scheduled_lr(const ScheduleConfig& cfg, int64_t step) {
  LT_CHECK(step >= 1, "optimizer steps count from 1");
  const double base = cfg.base_lr;
  const int64_t w = cfg.warmup_steps;
  if (w > 0 && step <= w) return base * double(step) / double(w);
  if (cfg.kind == LrSchedule::Constant) return base;
  LT_CHECK(cfg.total_steps > w, "decay schedule needs total_steps > warmup_steps (validate() first)");
  const double p = std::clamp(double(step - w) / double(cfg.total_steps - w), 0.0, 1.0);
  const double r = cfg.min_lr_ratio;
  if (cfg.kind == LrSchedule::Cosine) return base * (r + (1.0 - r) * 0.5 * (1.0 + std::cos(std::numbers::pi * p)));
  return base * (r + (1.0 - r) * (1.0 - p));
}

}  // namespace longtune
