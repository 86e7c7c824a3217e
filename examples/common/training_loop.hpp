// examples/common/training_loop.hpp - the training loop the trainers share: batches per epoch
// fixed by the seed, Adam with a learning-rate schedule and gradient clipping, a metrics log and a
// progress line, validation and checkpoints on a schedule, and an exact resume.
//
// A trainer supplies what is its own: the training pairs (batched by tokens), one training step
// (forward, loss, backward; the loop zeroes the gradients before and updates after), and a
// validation. Everything else, including the checkpoint format and its metadata, is here once.
//
// Data parallel (settings.distributed with more than one rank, under mpirun): every rank holds the
// same model; each step's batch (the same on every rank, fixed by the seed) is dealt out by
// sequence, rank r taking sequences r, r + N, ...; a step's forward, its combine() (one small
// all-reduce: the loss targets, the loss and the logged values of all ranks) and its backward run
// on that share; one all-reduce sums the gradient block; every rank then takes the same optimizer
// step. Each rank draws its own dropout and masking from the run's generator and its rank. Rank 0
// alone reads and writes the folder (checkpoints, metrics, progress) and sends the state it
// resumes from to the others; at each checkpoint the ranks check that their parameters still agree.
//
// Divergence: a loss or gradient norm that is not finite stops the run with a message naming the
// step, the value and the last good checkpoint (which is never overwritten by a bad one), or, with
// OnDivergence::skip, skips the step and halves the learning rate (a few times in a row at most).
// A loss far above its running average is warned about. Each checkpoint replaces the last only
// after it is verified, and the one before is kept beside it (checkpoint.safetensors.previous).
#pragma once

#include "distributed.hpp"
#include "training.hpp"

#include "moa/io/checkpoint.hpp"
#include "moa/optimizer.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/text/batching.hpp"

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moa_examples {

using namespace moa;  // the examples are moa programs

// What a loss or gradient norm that is not finite does.
enum class OnDivergence { stop, skip };

struct TrainingSettings {
  std::string name;              // labels the progress line ("MoA"); empty for none
  bool plain_progress = false;   // plain progress lines even on a terminal (runs sharing one)
  std::string folder;            // checkpoint.safetensors and metrics.jsonl go here
  std::string config;            // the model's description; a checkpoint of another one is refused
  long long steps = 1000;        // train until this step
  long long valid_every = 100;   // validate every N steps and at the last
  long long checkpoint_every = 100;  // save every N steps and at the last
  std::uint64_t seed = 1;        // fixes the batches of every epoch
  Index batch_tokens = 2048;     // padded tokens per batch
  double clip_norm = 0.0;        // gradient clipping by global norm, 0 for none
  bool resume = false;           // continue from the folder's checkpoint when there is one
  OnDivergence on_divergence = OnDivergence::stop;
  int max_consecutive_skips = 5;  // with OnDivergence::skip: more in a row stop the run
  int keep_snapshots = 0;        // the parameters of the last N checkpoints, kept for averaging
  Distributed distributed;       // the ranks training together (one process by default)
};

// What a training step reports: its loss, the tokens it trained on (for tokens/s), and any more
// values for the metrics log.
struct StepReport {
  double loss = 0.0;
  double tokens = 0.0;
  std::vector<std::pair<std::string, double>> values;
};

// Called once by a training step between its forward and its backward, with its report and the
// number of targets its mean loss averages over. Makes the report the whole batch's (loss and
// values averaged over all ranks' targets, tokens summed) and returns the factor for the gradient
// of the step's mean loss (CrossEntropyLoss::backward(factor)): with it the gradients the ranks
// sum are those of the mean over all the batch's targets. Auxiliary losses a model adds in its
// backward count as the mean over the ranks. One process: the report stays and the factor is 1.
using Combine = std::function<double(StepReport& report, double loss_targets)>;

// The logged curves, read back from metrics.jsonl (so a resumed run has its whole history).
// train_nlls: the steps' "train_nll" where a step reports one (the loss without label smoothing or
// auxiliary terms, comparable with a validation NLL), else their loss.
struct TrainingCurves {
  std::vector<double> steps, train_losses, train_nlls, valid_steps, valid_losses;
};

template <typename Scalar>
class TrainingLoop {
 public:
  using Batch = std::vector<std::size_t>;  // indices into the training pairs
  // A step trains on its share of the batch (all of it on one process) with the generator given.
  using Step = std::function<StepReport(const Batch& share, Rng& rng, const Combine& combine)>;
  using Validate = std::function<std::vector<std::pair<std::string, double>>()>;  // the first is "valid_loss"

  // rng is the run's training generator (dropout, masking): saved in checkpoints, restored on resume.
  TrainingLoop(TrainingSettings settings, const ParameterList<Scalar>& parameters, Adam<Scalar>& adam,
               std::function<double(long long)> schedule, Rng& rng)
      : settings_(std::move(settings)), parameters_(parameters), adam_(adam), schedule_(std::move(schedule)), rng_(rng) {
    MOA_CHECK(settings_.steps > 0 && settings_.valid_every > 0 && settings_.checkpoint_every > 0, "TrainingLoop",
              "steps, valid_every and checkpoint_every must be positive");
  }

  std::string checkpoint_path() const { return settings_.folder + "/checkpoint.safetensors"; }
  std::string metrics_path() const { return settings_.folder + "/metrics.jsonl"; }
  std::string snapshot_folder() const { return settings_.folder + "/snapshots"; }

  // The kept parameter snapshots (settings.keep_snapshots), oldest first, with their steps.
  std::vector<std::pair<long long, std::string>> snapshots() const {
    std::vector<std::pair<long long, std::string>> found;
    std::error_code error;
    if (!std::filesystem::is_directory(snapshot_folder(), error)) return found;
    for (const auto& entry : std::filesystem::directory_iterator(snapshot_folder())) {
      const std::string name = entry.path().filename().string();
      long long step = 0;
      char tail = 0;
      if (std::sscanf(name.c_str(), "step-%lld.safetensor%c", &step, &tail) == 2 && tail == 's' &&
          name == snapshot_name(step))
        found.emplace_back(step, entry.path().string());
    }
    std::sort(found.begin(), found.end());
    return found;
  }

  // Loads the checkpoint when resuming; returns the step to continue from (0 for a fresh run). A
  // run killed between the two renames of a checkpoint write has only the previous file: it
  // resumes from that one. Data parallel: rank 0 reads the folder and every other rank receives
  // its state (the parameters, the optimizer, the generator), so any number of ranks can resume a
  // checkpoint and no rank but the first needs the folder.
  long long restore() {
    const long long step = settings_.distributed.is_root() ? restore_from_folder() : 0;
    if (settings_.distributed.is_parallel()) return share_state(step);
    return step;
  }

  // Trains from `first_step` to settings.steps.
  void run(long long first_step, const std::vector<TokenPair>& train, const Step& train_step, const Validate& validate) {
    const Distributed& world = settings_.distributed;
    std::optional<MetricsLog> log;
    if (world.is_root()) log.emplace(metrics_path(), first_step > 0);
    ProgressLine progress(settings_.steps, settings_.name, settings_.plain_progress);
    double tokens = 0;
    long long step = first_step;
    int skipped_in_a_row = 0;
    LossWatch watch;
    while (step < settings_.steps) {
      const auto step_start = std::chrono::steady_clock::now();
      const Batch& batch = batch_for_step(train, step);
      ++step;
      zero_grad(parameters_, adam_.compute());  // on the optimizer's threads, as the update
      const StepReport report = train_share(batch, step, train_step);
      const double norm = settings_.clip_norm > 0 ? clip_grad_norm(parameters_, settings_.clip_norm, adam_.compute())
                                                  : grad_norm(parameters_, adam_.compute());
      if (!std::isfinite(report.loss) || !std::isfinite(norm)) {
        const std::string what = "step " + std::to_string(step) + ": the loss is " + number_text(report.loss) +
                                 " and the gradient norm " + number_text(norm);
        if (settings_.on_divergence == OnDivergence::skip && ++skipped_in_a_row <= settings_.max_consecutive_skips) {
          learning_rate_scale_ *= 0.5;
          if (world.is_root())
            std::fprintf(stderr, "\n%swarning: %s: step skipped, learning rate scaled by %g from now on\n", label().c_str(),
                         what.c_str(), learning_rate_scale_);
          continue;
        }
        MOA_CHECK(false, "TrainingLoop", "training diverged at ", what, " (",
                  skipped_in_a_row > 1 ? "after skipping steps; " : "",
                  "lower the learning rate, or try --on-divergence skip); ", last_good_description());
      }
      skipped_in_a_row = 0;
      const std::string warning = watch.check(report.loss);
      if (!warning.empty() && world.is_root())
        std::fprintf(stderr, "\n%swarning: step %lld: the loss %s %s (learning rate too high?)\n", label().c_str(), step,
                     number_text(report.loss).c_str(), warning.c_str());
      const double learning_rate = schedule_(step) * learning_rate_scale_;
      adam_.step(learning_rate);
      const double step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
      tokens += report.tokens;
      tokens_per_second_ = tokens / std::max(progress.seconds(), 1e-9);
      if (world.is_root()) progress.update(step, step - first_step, report.loss, tokens_per_second_, learning_rate);
      std::vector<std::pair<std::string, double>> values{{"train_loss", report.loss}, {"grad_norm", norm}};
      values.insert(values.end(), report.values.begin(), report.values.end());
      values.push_back({"lr", learning_rate});
      values.push_back({"tokens_per_second", tokens_per_second_});
      values.push_back({"step_seconds", step_seconds});
      if (world.is_parallel()) values.push_back({"all_reduce_seconds", all_reduce_seconds_});
      if (step % settings_.valid_every == 0 || step == settings_.steps) {
        const auto validation = validate();
        MOA_CHECK(std::isfinite(validation.front().second), "TrainingLoop", "training diverged at step ", step, ": the ",
                  validation.front().first, " is ", number_text(validation.front().second), "; ",
                  last_good_description());
        values.insert(values.end(), validation.begin(), validation.end());
      }
      if (log) log->write(step, values);
      if (step % settings_.checkpoint_every == 0 || step == settings_.steps) {
        check_ranks_agree(step);
        if (world.is_root()) save(step);
        last_good_step_ = step;
      }
    }
  }

 private:
  long long restore_from_folder() {
    if (!settings_.resume) {
      prune_snapshots(0);
      return 0;
    }
    std::string path = checkpoint_path();
    std::error_code error;
    if (!std::filesystem::exists(path, error)) {
      if (!std::filesystem::exists(previous_checkpoint(path), error)) return 0;
      path = previous_checkpoint(path);
      std::fprintf(stderr, "resume: '%s' is missing (a write was interrupted); resuming from '%s'\n",
                   checkpoint_path().c_str(), path.c_str());
    }
    std::map<std::string, std::string> metadata;
    try {
      metadata = load_checkpoint(path, parameters_, adam_, {{"config", settings_.config}});
    } catch (const Error& failure) {
      if (path != checkpoint_path() || !std::filesystem::exists(previous_checkpoint(path), error)) throw;
      MOA_CHECK(false, "resume", failure.what(), "; the checkpoint before it is kept as '", previous_checkpoint(path),
                "': rename it to '", path, "' to resume from there");
    }
    const long long step = metadata_integer(metadata, path, "step", 0, std::numeric_limits<long long>::max(), "resume");
    MOA_CHECK(step <= settings_.steps, "resume", "'", path, "' is at step ", step, ", beyond --steps ",
              settings_.steps, ": there is nothing left to train (raise --steps to go on)");
    MOA_CHECK(step == adam_.steps(), "resume", "'", path, "' is at step ", step, " but its optimizer at step ",
              adam_.steps());
    MOA_CHECK(metadata.count("rng") != 0, "resume", "'", path, "' has no 'rng' in its metadata");
    const std::string& rng_state = metadata.at("rng");
    char* end = nullptr;
    errno = 0;
    const unsigned long long state = std::strtoull(rng_state.c_str(), &end, 10);
    MOA_CHECK(!rng_state.empty() && rng_state[0] != '-' && end == rng_state.c_str() + rng_state.size() && errno == 0,
              "resume", "'", path, "': metadata 'rng' = '", rng_state, "' is not a generator state");
    rng_.set_state(static_cast<std::uint64_t>(state));
    learning_rate_scale_ = 1.0;
    if (metadata.count("lr_scale") != 0) {
      const std::string& text = metadata.at("lr_scale");
      const double scale = std::strtod(text.c_str(), &end);
      MOA_CHECK(!text.empty() && end == text.c_str() + text.size() && scale > 0.0 && scale <= 1.0, "resume", "'", path,
                "': metadata 'lr_scale' = '", text, "' is not a number in (0, 1]");
      learning_rate_scale_ = scale;
    }
    last_good_step_ = step;
    truncate_metrics(step);
    prune_snapshots(step);
    return step;
  }

 public:
  // "[MoA] " before the run's messages, when it has a name.
  std::string label() const { return settings_.name.empty() ? "" : "[" + settings_.name + "] "; }

  // The step of the last checkpoint written or resumed from (0: none yet).
  long long last_good_step() const { return last_good_step_; }

  double tokens_per_second() const { return tokens_per_second_; }

  TrainingCurves curves() const {
    TrainingCurves curves;
    std::ifstream log(metrics_path());
    for (std::string line; std::getline(log, line);) {
      auto number = [&](const std::string& key) {
        const auto at = line.find("\"" + key + "\": ");
        return at == std::string::npos ? std::nan("") : std::strtod(line.c_str() + at + key.size() + 4, nullptr);
      };
      curves.steps.push_back(number("step"));
      curves.train_losses.push_back(number("train_loss"));
      const double nll = number("train_nll");
      curves.train_nlls.push_back(std::isnan(nll) ? curves.train_losses.back() : nll);
      if (!std::isnan(number("valid_loss"))) {
        curves.valid_steps.push_back(number("step"));
        curves.valid_losses.push_back(number("valid_loss"));
      }
    }
    return curves;
  }

 private:
  // One step's forward and backward on this rank's share of the batch, and the all-reduce that
  // makes every rank's gradients the whole batch's.
  StepReport train_share(const Batch& batch, long long step, const Step& train_step) {
    const Distributed& world = settings_.distributed;
    bool combined = false;
    const Combine combine = [&](StepReport& report, double loss_targets) {
      MOA_CHECK(!combined, "TrainingLoop", "a training step called combine() twice");
      combined = true;
      return world.is_parallel() ? combine_report(report, loss_targets) : 1.0;
    };
    if (!world.is_parallel()) {
      StepReport report = train_step(batch, rng_, combine);
      check_combined(combined);
      return report;
    }
    const auto ranks = static_cast<std::size_t>(world.size());
    MOA_CHECK(batch.size() >= ranks, "TrainingLoop", "the batch of step ", step, " has ", batch.size(),
              " sequences, fewer than the ", ranks, " ranks: raise --batch-tokens");
    Batch share;
    for (std::size_t i = static_cast<std::size_t>(world.rank()); i < batch.size(); i += ranks) share.push_back(batch[i]);
    // The rank's own generator for this step: the run's generator advances once a step on every
    // rank alike (so a checkpoint holds one state), and the rank is mixed into the seed.
    Rng seeding(rng_.next_u64() ^ (0xD1B54A32D192ED03ULL * static_cast<std::uint64_t>(world.rank() + 1)));
    Rng rank_rng(seeding.next_u64());
    fail_for_test(step);
    StepReport report = train_step(share, rank_rng, combine);
    check_combined(combined);
    const auto start = std::chrono::steady_clock::now();
    const float mean = 1.0f / static_cast<float>(world.size());
    if (parameters_.contiguous()) {
      world.sum(parameters_.flat_grads().data(), parameters_.flat_size());
      parameters_.flat_grads() *= mean;
    } else {
      for (std::size_t i = 0; i < parameters_.size(); ++i) {
        world.sum(parameters_[i].grad().data(), parameters_[i].numel());
        parameters_[i].grad() *= mean;
      }
    }
    all_reduce_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return report;
  }

  static void check_combined(bool combined) {
    MOA_CHECK(combined, "TrainingLoop", "the training step did not call combine(report, loss_targets) between its "
              "forward and its backward");
  }

  double combine_report(StepReport& report, double loss_targets) const {
    const Distributed& world = settings_.distributed;
    // [values on this rank, loss targets, loss * targets, tokens, value * targets ...]
    std::vector<double> numbers{static_cast<double>(report.values.size()), loss_targets, report.loss * loss_targets,
                                report.tokens};
    for (const auto& value : report.values) numbers.push_back(value.second * loss_targets);
    world.sum(numbers.data(), static_cast<Index>(numbers.size()));
    MOA_CHECK(numbers[0] == static_cast<double>(report.values.size() * static_cast<std::size_t>(world.size())),
              "TrainingLoop", world.label(), "the ranks' training steps report different numbers of values");
    const double total_targets = numbers[1];
    const double share = total_targets > 0 ? 1.0 / total_targets : 0.0;
    report.loss = numbers[2] * share;
    report.tokens = numbers[3];
    for (std::size_t i = 0; i < report.values.size(); ++i) report.values[i].second = numbers[4 + i] * share;
    return static_cast<double>(world.size()) * loss_targets * share;
  }

  // Rank 0's step, generator, learning-rate scale, parameters and optimizer moments, on every rank.
  long long share_state(long long step) {
    const Distributed& world = settings_.distributed;
    double scale = learning_rate_scale_;
    std::uint64_t scale_bits = 0;
    std::memcpy(&scale_bits, &scale, sizeof scale);
    std::uint64_t header[4] = {static_cast<std::uint64_t>(step), rng_.state(), scale_bits,
                               static_cast<std::uint64_t>(last_good_step_)};
    world.broadcast(header, 4);
    std::memcpy(&scale, &header[2], sizeof scale);
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      world.broadcast(parameters_[i].value().data(), parameters_[i].numel());
      world.broadcast(adam_.first_moment(i).data(), parameters_[i].numel());
      world.broadcast(adam_.second_moment(i).data(), parameters_[i].numel());
    }
    step = static_cast<long long>(header[0]);
    rng_.set_state(header[1]);
    learning_rate_scale_ = scale;
    last_good_step_ = static_cast<long long>(header[3]);
    adam_.set_steps(step);
    return step;
  }

  // The ranks take identical steps from identical parameters; a difference (a rank computing
  // differently) is caught here, at each checkpoint, rather than silently training N models.
  void check_ranks_agree(long long step) const {
    if (!settings_.distributed.is_parallel()) return;
    std::uint64_t hash = 1469598103934665603ULL;  // FNV-1a over the parameters' bits
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(parameters_[i].values().data());
      const std::size_t count = static_cast<std::size_t>(parameters_[i].numel()) * sizeof(Scalar);
      for (std::size_t b = 0; b < count; ++b) hash = (hash ^ bytes[b]) * 1099511628211ULL;
    }
    MOA_CHECK(settings_.distributed.same_everywhere(hash), "TrainingLoop", settings_.distributed.label(),
              "the ranks' parameters differ after step ", step, ": the ranks no longer train one model");
  }

  // For the test of a failing rank: MOA_TEST_FAIL_RANK_AT_STEP="r:s" makes rank r throw at step s.
  void fail_for_test(long long step) const {
    const char* value = std::getenv("MOA_TEST_FAIL_RANK_AT_STEP");
    if (value == nullptr) return;
    int rank = -1;
    long long at = -1;
    if (std::sscanf(value, "%d:%lld", &rank, &at) == 2 && rank == settings_.distributed.rank() && at == step)
      MOA_CHECK(false, "TrainingLoop", "failing at step ", step, " as MOA_TEST_FAIL_RANK_AT_STEP asks");
  }

  // The batches of an epoch are fixed by the seed and the epoch number, so step s always sees the
  // same batch: a resumed run continues exactly where it stopped.
  const Batch& batch_for_step(const std::vector<TokenPair>& train, long long step) {
    if (batches_per_epoch_ == 0) {
      Rng probe(0);
      batches_per_epoch_ = static_cast<long long>(make_token_batches(train, settings_.batch_tokens, probe).size());
    }
    const long long epoch = step / batches_per_epoch_;
    if (epoch != current_epoch_) {
      Rng order(settings_.seed * 1000003ULL + static_cast<std::uint64_t>(epoch));
      epoch_batches_ = make_token_batches(train, settings_.batch_tokens, order);
      current_epoch_ = epoch;
    }
    return epoch_batches_[static_cast<std::size_t>(step % batches_per_epoch_)];
  }

  // Written only when every value is finite (save_checkpoint refuses otherwise), verified, with the
  // checkpoint before kept beside it.
  void save(long long step) {
    CheckpointWriting writing;
    writing.sync = sync_checkpoint;
    writing.keep_previous = true;
    char scale[32];
    std::snprintf(scale, sizeof scale, "%.17g", learning_rate_scale_);
    try {
      save_checkpoint(checkpoint_path(), parameters_, adam_,
                      {{"config", settings_.config}, {"step", std::to_string(step)},
                       {"rng", std::to_string(rng_.state())}, {"lr_scale", scale}},
                      writing);
    } catch (const Error& failure) {
      MOA_CHECK(false, "TrainingLoop", "the checkpoint of step ", step, " failed: ", failure.what(), "; ",
                last_good_description());
    }
    last_good_step_ = step;
    if (settings_.keep_snapshots > 0) {
      std::filesystem::create_directories(snapshot_folder());
      save_safetensors(snapshot_folder() + "/" + snapshot_name(step), parameters_, DType::F32,
                       {{"config", settings_.config}, {"step", std::to_string(step)}});
      prune_snapshots(step);
    }
  }

  static std::string snapshot_name(long long step) {
    char name[64];
    std::snprintf(name, sizeof name, "step-%08lld.safetensors", step);
    return name;
  }

  // Removes snapshots after `step` (a resumed run writes them again) and all but the newest
  // keep_snapshots up to it; a fresh run (step 0) starts with none.
  void prune_snapshots(long long step) const {
    auto found = snapshots();
    std::size_t kept = 0;
    for (auto it = found.rbegin(); it != found.rend(); ++it) {
      const bool keep = step > 0 && it->first <= step && kept < static_cast<std::size_t>(std::max(settings_.keep_snapshots, 0));
      if (keep) ++kept;
      else std::filesystem::remove(it->second);
    }
  }

  // Forces a finished checkpoint to the disk. For the crash test, MOA_TEST_KILL_IN_CHECKPOINT=N
  // kills the process (SIGKILL, as kill -9) in its Nth checkpoint write, when the new file is
  // complete but has not yet replaced the old one.
  static bool sync_checkpoint(std::FILE* file) {
    const bool synced = sync_to_disk(file);
    static long long remaining = [] {
      const char* value = std::getenv("MOA_TEST_KILL_IN_CHECKPOINT");
      return value != nullptr ? std::atoll(value) : 0LL;
    }();
    if (remaining > 0 && --remaining == 0) {
#ifdef SIGKILL
      std::raise(SIGKILL);
#endif
      std::abort();
    }
    return synced;
  }

  std::string last_good_description() const {
    if (last_good_step_ == 0) return "no checkpoint had been written";
    return "the last good checkpoint, step " + std::to_string(last_good_step_) + ", is kept in '" + checkpoint_path() +
           "'";
  }

  static std::string number_text(double value) {
    if (std::isnan(value)) return "nan";  // never "-nan"
    char text[40];
    std::snprintf(text, sizeof text, "%.6g", value);
    return text;
  }

  // A loss far above the first one of the run (worse than the model it started from) or above
  // its running average (about the last hundred steps, once a hundred have set it): more than four
  // times it and more than two nats above. Gives the warning's text, at most every hundred steps.
  class LossWatch {
   public:
    std::string check(double loss) {
      std::string warning;
      if (steps_ == 0) first_ = loss;
      else if (loss > 4.0 * first_ && loss > first_ + 2.0)
        warning = "is far above the first step's " + number_text(first_);
      else if (steps_ >= 100 && loss > 4.0 * average_ && loss > average_ + 2.0)
        warning = "is far above its running average " + number_text(average_);
      average_ = steps_ == 0 ? loss : 0.99 * average_ + 0.01 * loss;
      ++steps_;
      if (warning.empty() || (last_warning_ > 0 && steps_ - last_warning_ < 100)) return {};
      last_warning_ = steps_;
      return warning;
    }

   private:
    double first_ = 0.0;
    double average_ = 0.0;
    long long steps_ = 0;
    long long last_warning_ = 0;
  };

  // Drops logged steps after `step`, which the resumed run computes again.
  void truncate_metrics(long long step) const {
    std::vector<std::string> kept;
    std::ifstream log(metrics_path());
    for (std::string line; std::getline(log, line);)
      if (std::strtoll(line.c_str() + line.find(':') + 1, nullptr, 10) <= step) kept.push_back(line);
    log.close();
    std::ofstream rewritten(metrics_path(), std::ios::trunc);
    for (const auto& line : kept) rewritten << line << '\n';
  }

  TrainingSettings settings_;
  ParameterList<Scalar> parameters_;
  Adam<Scalar>& adam_;
  std::function<double(long long)> schedule_;
  Rng& rng_;
  long long batches_per_epoch_ = 0;
  long long current_epoch_ = -1;
  std::vector<Batch> epoch_batches_;
  double tokens_per_second_ = 0.0;
  double learning_rate_scale_ = 1.0;  // halved by each skipped step (OnDivergence::skip)
  double all_reduce_seconds_ = 0.0;   // the last step's gradient all-reduce
  long long last_good_step_ = 0;
};

}  // namespace moa_examples
