#include "src/train/trainer.hpp"

#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/atomic_file.hpp"
#include "io/checkpoint.hpp"
#include "io/hf_config.hpp"
#include "io/safetensors.hpp"
#include "io/token_dataset.hpp"
#include "src/common/error.hpp"
#include "src/data/builtin_task.hpp"
#include "src/data/global_batch.hpp"
#include "src/data/packer.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/train/device_engine.hpp"
#include "src/train/evaluate.hpp"
#include "src/train/sharded_state.hpp"
#include "src/train/stop_signal.hpp"

namespace fs = std::filesystem;

namespace longtune {

namespace {

double peak_rss_mib() {
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0.0;
  return double(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

std::string format_duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), (int(s) % 3600) / 60);
  return buf;
}

// Keeps only the metrics records of steps <= `step` (a resumed run repeats the later ones).
// Returns the held-out loss of the last evaluation record kept (NaN when there is none).
double truncate_metrics(const fs::path& path, int64_t step) {
  double last_eval_loss = std::nan("");
  if (!fs::exists(path)) return last_eval_loss;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    const auto pos = line.find("\"step\":");
    if (pos == std::string::npos) continue;
    if (std::stoll(line.substr(pos + 7)) > step) continue;
    kept += line + "\n";
    const auto eval_pos = line.find("\"eval_loss\":");
    if (eval_pos != std::string::npos) last_eval_loss = std::strtod(line.c_str() + eval_pos + 12, nullptr);
  }
  write_file_atomic(path.string(), kept);
  return last_eval_loss;
}

}  // namespace

struct Trainer::Impl {
  TrainConfig cfg;
  Comm& comm;
  bool root;  // rank 0: prints, writes metrics, commits checkpoints
  KokkosScope kokkos;
  LlamaConfig model_cfg;
  std::unique_ptr<ParamTable> table;
  TokenDataset train_data, eval_data;
  std::unique_ptr<ShardedTrainState> state;
  std::unique_ptr<LlamaCpu> model;
  std::unique_ptr<DeviceEngine> device;  // --device cuda: the state's working copy lives there
  ScheduleConfig schedule;
  fs::path run_dir, ckpt_dir, metrics_path;
  int64_t start_step = 0, tokens_seen = 0, epoch = 0;
  PackerCursor cursor{};
  std::string run_id;
  double last_eval_loss = std::nan("");  // latest held-out loss (rank 0), shown on the step lines

  Impl(TrainConfig c, Comm& cm) : cfg(std::move(c)), comm(cm), root(cm.rank() == 0), kokkos(cfg.threads) { setup(); }
  std::string broadcast_string(std::string s);
  void setup();
  bool try_resume(double* loss_scale);
  void save_checkpoint(int64_t step);
  void evaluate(int64_t step, std::ofstream& metrics);
  void report_host_memory();
  TrainOutcome run();
  // Model FLOP utilization at `tokens_per_s` (GPU runs; the brief's FLOP count at seq_len).
  double mfu(double tokens_per_s) const {
    return device ? tokens_per_s * model_flops_per_token(model_cfg, cfg.seq_len) / device->peak_flops() : 0.0;
  }
  std::string mfu_json(double tokens_per_s) const { return device ? std::to_string(mfu(tokens_per_s)) : "null"; }
  std::string vram_json() const { return device ? std::to_string(device->peak_memory_gib()) : "null"; }
};

void Trainer::Impl::setup() {
  if (cfg.device != "cpu") check_device(cfg);  // before anything is loaded or written
  // ---- model ----
  if (cfg.builtin_model()) {
    model_cfg = cfg.device == "cuda" ? builtin_model_config_gpu() : builtin_model_config();
  } else {
    model_cfg = load_hf_model_config(cfg.model_dir);
  }
  table = std::make_unique<ParamTable>(model_cfg);

  // ---- data (validated against the model's vocabulary before any compute) ----
  if (cfg.builtin_data()) {
    const BuiltinTrainDefaults d = builtin_train_defaults();
    train_data = builtin_dataset(d.train_docs, cfg.seed + 1);
    train_data.path = "built-in task (train)";
    eval_data = builtin_dataset(d.eval_docs, cfg.seed + 1000003);
    eval_data.path = "built-in task (held-out)";
    if (train_data.vocab_size > model_cfg.vocab_size)
      throw InputError(train_data.path, "vocab_size", "at most the model's vocab_size " +
                       std::to_string(model_cfg.vocab_size), std::to_string(train_data.vocab_size));
  } else {
    train_data = load_token_dataset(cfg.data, model_cfg.vocab_size);
    if (!cfg.eval_data.empty()) eval_data = load_token_dataset(cfg.eval_data, model_cfg.vocab_size);
  }
  if (root && model_cfg.max_position_embeddings > 0 && cfg.seq_len > model_cfg.max_position_embeddings)
    std::fprintf(stderr, "[train] warning: --seq-len %lld exceeds the model's max_position_embeddings %lld\n",
                 (long long)cfg.seq_len, (long long)model_cfg.max_position_embeddings);

  // ---- schedule ----
  schedule.kind = parse_lr_schedule(cfg.schedule);
  schedule.base_lr = cfg.adamw.lr;
  schedule.warmup_steps = cfg.warmup_steps;
  schedule.total_steps = cfg.steps;
  schedule.min_lr_ratio = cfg.min_lr_ratio;
  validate(schedule);
  validate(cfg.adamw);

  // ---- run directory: refuse to mix runs ----
  run_dir = cfg.run_dir;
  ckpt_dir = run_dir / "ckpt";
  metrics_path = run_dir / "metrics.jsonl";
  std::vector<std::string> warnings;
  const bool has_checkpoints =
      fs::exists(ckpt_dir) && find_latest_checkpoint(ckpt_dir.string(), &warnings, CheckpointCheck::kStructure);
  if (has_checkpoints && cfg.resume == "none")
    throw ConfigError(run_dir.string() + ": run-dir: expected a new or empty run directory (or --resume auto), got " +
                      "one holding checkpoints of an earlier run");
  if (!has_checkpoints && cfg.resume == "none" && fs::exists(metrics_path))
    throw ConfigError(run_dir.string() + ": run-dir: expected a new run directory, got one holding metrics.jsonl " +
                      "of another run (use a new --run-dir)");
  if (cfg.resume != "auto" && cfg.resume != "none" && !fs::exists(cfg.resume))
    throw ConfigError(cfg.resume + ": resume: expected an existing checkpoint directory, got no such path");
  if (root) fs::create_directories(ckpt_dir);
  comm.barrier();

  // ---- this rank's shard of the state, and the initial weights ----
  // A GPU run whose host state cannot fit this node is refused before it is allocated.
  if (cfg.device == "cuda") check_host_memory(device_engine_options(cfg), model_cfg, comm);
  // bf16 host gradients (GPU offload) shrink the state's gradient array; nothing else reads it.
  const bool bf16_host_grads = cfg.device == "cuda" && cfg.offload != "none" && cfg.host_grad_dtype == "bf16";
  state = std::make_unique<ShardedTrainState>(*table, comm, cfg.adamw, NumaPlacement{},
                                              bf16_host_grads ? DType::BF16 : DType::F32);
  if (cfg.builtin_model()) {
    // The built-in model is tiny and its init is one sequential stream over the flat buffer: every
    // rank builds it whole and keeps its slice.
    std::vector<float> full(size_t(table->total_elements()), 0.0f);
    builtin_init_weights(model_cfg, *table, cfg.init_seed, full.data());
    state->load_full(full.data());
  } else {
    // Each rank reads only the bytes of its own shard (an 8B model is 32 GB in fp32: a full copy
    // per rank would undo the sharding).
    const SafetensorsDir dir(cfg.model_dir);
    state->load_range([&](int64_t begin, int64_t end, float* dst) {
      load_hf_weights_range(dir, *table, begin, end, dst);
    });
  }
  model = std::make_unique<LlamaCpu>(model_cfg, *table);

  std::ostringstream id;
  id << std::hex << std::chrono::system_clock::now().time_since_epoch().count();
  run_id = broadcast_string(id.str());
  double resumed_loss_scale = 0.0;
  const bool resumed = try_resume(&resumed_loss_scale);
  if (cfg.device == "cuda") {
    // Refuses a run that cannot fit, with the memory plan, before any step. Several ranks or any
    // offload: the sharded engine, working on this rank's shard in `state` itself.
    device = make_device_engine(device_engine_options(cfg), model_cfg, *table, *state);
    device->upload_state(state->master(), state->exp_avg(), state->exp_avg_sq());
    if (resumed && resumed_loss_scale > 0.0) device->set_loss_scale(resumed_loss_scale);
  }
  if (!resumed && root) {
    write_file_atomic((run_dir / "config.ini").string(), to_ini(cfg));
    write_file_atomic((run_dir / "model_config.json").string(), hf_config_to_json(model_cfg));
  }
  comm.barrier();
}

std::string Trainer::Impl::broadcast_string(std::string s) {
  int64_t n = int64_t(s.size());
  comm.broadcast(&n, sizeof n, 0);
  s.resize(size_t(n));
  if (n > 0) comm.broadcast(s.data(), size_t(n), 0);
  return s;
}

bool Trainer::Impl::try_resume(double* loss_scale) {
  // Rank 0 picks the checkpoint (validating every file), the others open the same one; each
  // rank then reads its own range, whatever world size wrote it (resharding).
  std::string chosen;
  if (root) {
    std::optional<CheckpointRef> found;
    std::vector<std::string> warnings;
    if (cfg.resume == "auto") found = find_latest_checkpoint(ckpt_dir.string(), &warnings);
    else if (cfg.resume != "none") found = open_checkpoint(cfg.resume);
    for (const auto& w : warnings) std::fprintf(stderr, "[train] warning: %s\n", w.c_str());
    if (found) chosen = found->dir;
  }
  chosen = broadcast_string(chosen);
  if (chosen.empty()) return false;
  const CheckpointRef ref0 = open_checkpoint(chosen, CheckpointCheck::kStructure);
  const CheckpointRef* ref = &ref0;
  check_param_table(*ref, *table);
  const TrainerState ts = read_trainer_state(*ref);
  const int64_t begin = state->shard_begin();
  const int64_t len = state->shard_data_len();
  std::fill_n(state->master(), state->shard_len(), 0.0f);
  std::fill_n(state->exp_avg(), state->shard_len(), 0.0f);
  std::fill_n(state->exp_avg_sq(), state->shard_len(), 0.0f);
  if (len > 0) read_shard(*ref, begin, len, state->master(), state->exp_avg(), state->exp_avg_sq());
  start_step = ts.step;
  *loss_scale = ts.loss_scale;
  tokens_seen = ts.tokens_seen;
  epoch = ts.epoch;
  cursor = PackerCursor{ts.cursor_order_index, ts.cursor_offset_in_doc};
  run_id = ts.run_id;
  if (root) {
    last_eval_loss = truncate_metrics(metrics_path, start_step);
    std::printf("[train] resumed from %s at step %lld (written by %d rank%s, now %d)\n", ref->dir.c_str(),
                (long long)start_step, ref->world_size, ref->world_size == 1 ? "" : "s", comm.size());
  }
  return true;
}

void Trainer::Impl::save_checkpoint(int64_t step) {
  TrainerState ts;
  ts.step = step;
  ts.tokens_seen = tokens_seen;
  ts.epoch = epoch;
  ts.cursor_order_index = cursor.order_index;
  ts.cursor_offset_in_doc = cursor.offset_in_doc;
  ts.data_seed = cfg.seed;
  ts.rng_state = "order=document_order(seed + epoch)";
  ts.loss_scale = device ? device->loss_scale() : 1.0;
  if (device) device->download_state(state->master(), state->exp_avg(), state->exp_avg_sq());
  ts.resolved_config = to_ini(cfg);
  ts.run_id = run_id;
  // Shards are saved clipped to the table's length: the padding that makes them equal is not data,
  // and a checkpoint then reads back at any world size.
  const int64_t total = table->total_elements();
  const int64_t begin = std::min(state->shard_begin(), total);
  const int64_t len = std::min(state->shard_len(), total - begin);
  CheckpointShard shard{state->master(), state->exp_avg(), state->exp_avg_sq(), begin, len, total,
                        comm.rank(), comm.size()};
  // Rank 0 creates the temporary directory, every rank writes its file, rank 0 commits (rename,
  // `latest`, pruning) once all files are complete.
  CheckpointWriter writer(ckpt_dir.string(), cfg.keep_last);
  if (root) writer.begin(step);
  comm.barrier();
  const std::string tmp = writer.tmp_dir(step);
  writer.write_rank(tmp, shard, *table, ts);
  comm.barrier();
  if (root) writer.commit(step, tmp, comm.size());
  comm.barrier();
}

void Trainer::Impl::evaluate(int64_t step, std::ofstream& metrics) {
  if (eval_data.num_documents() <= 0 || cfg.eval_every < 0) return;
  const auto t0 = std::chrono::steady_clock::now();
  EvalResult r;
  std::vector<float> full;
  if (device) {
    // GPU: the loss on the device; the built-in task's accuracy check reads the host weights.
    r = evaluate_dataset([&](const PackedBatch& b) { return device->evaluate(b); }, eval_data, cfg.seq_len,
                         cfg.micro_batch);
    if (cfg.builtin_data()) {
      device->download_state(state->master(), nullptr, nullptr);
      full = state->gather_full();
    }
  } else {
    // CPU engine: every rank gathers the full weights and evaluates; rank 0 reports.
    full = state->gather_full();
    if (!root) return;
    r = evaluate_dataset(*model, full.data(), eval_data, cfg.seq_len, cfg.micro_batch);
  }
  if (!root) return;
  std::string extra_text, extra_json;
  if (cfg.builtin_data()) {
    const RetrievalAccuracy acc = builtin_retrieval_accuracy(*model, full.data(), eval_data, cfg.seq_len);
    char buf[160];
    std::snprintf(buf, sizeof buf, " | retrieval accuracy %.1f%% (%lld/%lld)", 100.0 * acc.accuracy(),
                  (long long)acc.correct, (long long)acc.total);
    extra_text = buf;
    std::snprintf(buf, sizeof buf, ",\"eval_retrieval_accuracy\":%.6f", acc.accuracy());
    extra_json = buf;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[eval] step %lld | held-out loss %.4f | perplexity %.3f%s | %.1fs\n", (long long)step,
              r.loss.mean(), std::exp(r.loss.mean()), extra_text.c_str(), secs);
  last_eval_loss = r.loss.mean();
  metrics << "{\"step\":" << step << ",\"eval_loss\":" << r.loss.mean() << ",\"eval_perplexity\":"
          << std::exp(r.loss.mean()) << ",\"eval_targets\":" << r.loss.count << extra_json << "}\n";
  metrics.flush();
}

TrainOutcome Trainer::Impl::run() {
  if (root) std::printf("[train] model: %s | %lld layers, hidden %lld, heads %lld/%lld, vocab %lld, %.3f M parameters\n",
              cfg.builtin_model() ? "built-in tiny Llama" : cfg.model_dir.c_str(),
              (long long)model_cfg.num_hidden_layers, (long long)model_cfg.hidden_size,
              (long long)model_cfg.num_attention_heads, (long long)model_cfg.num_key_value_heads,
              (long long)model_cfg.vocab_size, double(table->num_parameters()) / 1e6);
  if (root) std::printf("[train] data: %s | %lld documents, %lld tokens | seq_len %lld x micro-batch %lld x accum %lld\n",
              train_data.path.c_str(), (long long)train_data.num_documents(), (long long)train_data.num_tokens(),
              (long long)cfg.seq_len, (long long)cfg.micro_batch, (long long)cfg.grad_accum);
  if (root && device) std::printf("[train] %s\n", device->describe().c_str());
  if (root)
    std::printf("[train] %d rank%s (%s) | host state per rank: %s | %d threads | run dir %s\n", comm.size(),
                comm.size() == 1 ? "" : "s", comm.backend().c_str(), state->arena().describe().c_str(),
                KokkosScope::concurrency(), run_dir.c_str());

  std::ofstream metrics;
  if (root) {
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) throw IoError(metrics_path.string() + ": cannot open for appending");
  }
  // One rank here; the distributed engine passes its world size and rank.
  GlobalBatchStream stream(train_data, cfg.seq_len, cfg.micro_batch, cfg.grad_accum, comm.size(), comm.rank(),
                           cfg.seed, cfg.shuffle);
  stream.set_cursor(GlobalBatchCursor{epoch, cursor});

  if (start_step == 0 && cfg.eval_every > 0) evaluate(0, metrics);
  const auto t_start = std::chrono::steady_clock::now();
  double window_tokens = 0, window_secs = 0;
  const int64_t last_step = cfg.stop_after > 0 ? std::min(cfg.steps, start_step + cfg.stop_after) : cfg.steps;
  for (int64_t step = start_step + 1; step <= last_step; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const RankBatch batch = stream.next();
    epoch = stream.cursor().epoch;
    cursor = stream.cursor().packer;
    const double lr = scheduled_lr(schedule, step);
    ShardedStepResult r;
    if (device) {
      const DeviceStepResult d = device->train_step(batch.micro_batches, batch.global_targets, step, lr);
      r.loss = d.loss;
      r.optim = d.optim;
      r.skipped = d.skipped;
      r.tokens = d.tokens;
    } else {
      r = sharded_train_step(*model, *state, batch.micro_batches, batch.global_targets, step, lr);
    }
    tokens_seen += r.tokens;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    window_tokens += double(r.tokens);
    window_secs += secs;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double eta = elapsed / double(step - start_step) * double(cfg.steps - step);  // to the run's end
    if (root) metrics << "{\"step\":" << step << ",\"loss\":" << r.loss.mean() << ",\"lr\":" << lr
            << ",\"grad_norm\":" << r.optim.grad_norm << ",\"clip_coef\":" << r.optim.clip_coef
            << ",\"targets\":" << r.loss.count << ",\"tokens\":" << r.tokens << ",\"tokens_seen\":" << tokens_seen
            << ",\"step_seconds\":" << secs << ",\"tokens_per_s\":" << double(r.tokens) / secs
            << ",\"mfu\":" << mfu_json(double(r.tokens) / secs) << ",\"peak_vram_gib\":" << vram_json()
            << ",\"peak_rss_mib\":" << peak_rss_mib() << ",\"eta_s\":" << eta
            << ",\"skipped\":" << (r.skipped ? "true" : "false") << (device ? device->step_metrics_json() : "")
            << "}\n";
    if (root) metrics.flush();
    if (root && (step % cfg.log_every == 0 || step == cfg.steps || step == start_step + 1)) {
      std::string gpu_part;
      if (device) {
        char buf[96];
        std::snprintf(buf, sizeof buf, " | MFU %.1f%% | peak VRAM %.1f GiB",
                      100.0 * mfu(window_tokens / window_secs), device->peak_memory_gib());
        gpu_part = buf;
      }
      std::string eval_part;
      if (std::isfinite(last_eval_loss)) {
        char buf[64];
        std::snprintf(buf, sizeof buf, " | eval loss %.4f ppl %.2f", last_eval_loss, std::exp(last_eval_loss));
        eval_part = buf;
      }
      std::printf("step %5lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s%s | peak RSS %.0f MiB | ETA %s%s%s\n",
                  (long long)step, (long long)cfg.steps, r.loss.mean(), lr, r.optim.grad_norm,
                  window_tokens / window_secs, gpu_part.c_str(), peak_rss_mib(), format_duration(eta).c_str(),
                  eval_part.c_str(), r.skipped ? (device && batch.global_targets > 0 ? " | skipped: fp16 overflow, loss scale halved"
                                                                  : " | skipped: no counted targets")
                            : "");
      std::fflush(stdout);
      window_tokens = window_secs = 0;
    }
    if (cfg.eval_every > 0 && step % cfg.eval_every == 0 && step != cfg.steps) evaluate(step, metrics);
    const bool saved = (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0) || step == last_step;
    if (saved) save_checkpoint(step);
    // Stop request (docs/slurm.md): the signal may have reached only one rank (`scancel --signal`
    // to the batch step, one forwarded kill), so the ranks agree by a max over their flags -- one
    // scalar per step -- and every rank stops after this same step. At the last step the run ends
    // anyway, with its checkpoint, and exits 0: nothing left to requeue.
    double signo = double(stop_signal_received());
    comm.all_reduce_max(&signo, 1);
    if (signo > 0 && step < last_step) {
      if (root) {
        std::printf("[train] signal %s: checkpointing step %lld and exiting for requeue (exit %d)\n",
                    signal_name(int(signo)).c_str(), (long long)step, kExitRequeue);
        std::fflush(stdout);
      }
      if (!saved) save_checkpoint(step);
      if (root) {
        std::printf("[train] checkpoint of step %lld in %s; `longtune train` with the same run dir resumes\n",
                    (long long)step, ckpt_dir.c_str());
        std::fflush(stdout);
      }
      return TrainOutcome{int(signo), step};
    }
  }
  if (last_step < cfg.steps) {
    if (root) std::printf("[train] stopped after step %lld of %lld (--stop-after); `longtune train` with the same run dir resumes\n",
                (long long)last_step, (long long)cfg.steps);
    return TrainOutcome{0, last_step};
  }
  if (start_step < cfg.steps) evaluate(cfg.steps, metrics);
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (root)
    std::printf("[train] done: %lld steps in %s, %lld tokens seen; checkpoint in %s\n",
                (long long)(cfg.steps - start_step), format_duration(total).c_str(), (long long)tokens_seen,
                ckpt_dir.c_str());
  report_host_memory();
  return TrainOutcome{0, cfg.steps};
}

// Host memory of every rank (what `numastat -p` shows, summed over nodes) and of its optimizer
// state, printed by rank 0: the state is 1/N of the single-process run.
void Trainer::Impl::report_host_memory() {
  const int n = comm.size();
  std::vector<double> mib(size_t(2 * n), 0.0);
  const NumaUsage usage = host_memory_per_node();
  mib[size_t(comm.rank())] = double(usage.total()) / 1048576.0;
  mib[size_t(n + comm.rank())] = double(state->arena().size()) / 1048576.0;
  comm.all_reduce_sum(mib.data(), mib.size());
  if (!root) return;
  std::printf("[train] rank 0 %s\n", format_numa_usage(usage).c_str());
  std::string line = "[train] host memory per rank (MiB, process / optimizer state):";
  char buf[64];
  for (int r = 0; r < n; ++r) {
    std::snprintf(buf, sizeof buf, " r%d %.1f/%.2f", r, mib[size_t(r)], mib[size_t(n + r)]);
    line += buf;
  }
  std::printf("%s\n", line.c_str());
}

Trainer::Trainer(TrainConfig cfg, Comm& comm) : impl_(std::make_unique<Impl>(std::move(cfg), comm)) {}
Trainer::~Trainer() = default;
TrainOutcome Trainer::run() { return impl_->run(); }

}  // namespace longtune
