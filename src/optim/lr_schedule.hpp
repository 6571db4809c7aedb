// Learning-rate schedules of the trainer.
//
// `step` counts optimizer steps from 1 (the first update uses step 1), W = warmup_steps,
// T = total_steps, r = min_lr_ratio, base = base_lr:
//   warmup (all kinds, when W > 0 and step <= W):   lr = base * step / W
//   constant:                                        lr = base
//   after warmup, with progress p = clamp((step - W) / (T - W), 0, 1):
//     cosine:  lr = base * (r + (1 - r) * 0.5 * (1 + cos(pi * p)))
//     linear:  lr = base * (r + (1 - r) * (1 - p))
// so the decay reaches base * r at step T and stays there after it. Cosine and linear need T > W.
// (transformers' get_cosine_schedule_with_warmup counts from 0; here step 1 is the first update.)
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace longtune {

enum class LrSchedule { Constant, Cosine, Linear };

struct ScheduleConfig {
  LrSchedule kind = LrSchedule::Constant;
  double base_lr = 1e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;    // needed by cosine and linear
  double min_lr_ratio = 0.0;  // floor of the decay, as a fraction of base_lr
};

// Parses "constant", "cosine" or "linear" (ConfigError otherwise).
LrSchedule parse_lr_schedule(const std::string& name);
std::string_view lr_schedule_name(LrSchedule s);
// Throws ConfigError for negative steps or lr, min_lr_ratio outside [0, 1], or a decay schedule
// with total_steps <= warmup_steps.
void validate(const ScheduleConfig& cfg);
// The learning rate of optimizer step `step` (>= 1), by the formulas above.
double scheduled_lr(const ScheduleConfig& cfg, int64_t step);

}  // namespace longtune
