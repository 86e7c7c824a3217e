// examples/common/training_loop.hpp - the training loop the trainers share: batches per epoch
// fixed by the seed, Adam with a learning-rate schedule and gradient clipping, a metrics log and a
// progress line, validation and checkpoints on a schedule, and an exact resume.
//
// A trainer supplies what is its own: the training pairs (batched by tokens), one training step
// (forward, loss, backward; the loop zeroes the gradients before and updates after), and a
// validation. Everything else, including the checkpoint format and its metadata, is here once.
//
// Divergence: a loss or gradient norm that is not finite stops the run with a message naming the
// step, the value and the last good checkpoint (which is never overwritten by a bad one), or, with
// OnDivergence::skip, skips the step and halves the learning rate (a few times in a row at most).
// A loss far above its running average is warned about. Each checkpoint replaces the last only
// after it is verified, and the one before is kept beside it (checkpoint.safetensors.previous).
#pragma once

#include "training.hpp"

#include "moa/io/checkpoint.hpp"
#include "moa/optimizer.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/text/batching.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
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
};

// What a training step reports: its loss, the tokens it trained on (for tokens/s), and any more
// values for the metrics log.
struct StepReport {
  double loss = 0.0;
  double tokens = 0.0;
  std::vector<std::pair<std::string, double>> values;
};

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
  using Step = std::function<StepReport(const Batch& batch, Rng& rng)>;
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
  // resumes from that one.
  long long restore() {
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

  // Trains from `first_step` to settings.steps.
  void run(long long first_step, const std::vector<TokenPair>& train, const Step& train_step, const Validate& validate) {
    MetricsLog log(metrics_path(), first_step > 0);
    ProgressLine progress(settings_.steps, settings_.name, settings_.plain_progress);
    double tokens = 0;
    long long step = first_step;
    int skipped_in_a_row = 0;
    LossWatch watch;
    while (step < settings_.steps) {
      const Batch& batch = batch_for_step(train, step);
      ++step;
      parameters_.zero_grad();
      StepReport report = train_step(batch, rng_);
      const double norm = settings_.clip_norm > 0 ? clip_grad_norm(parameters_, settings_.clip_norm)
                                                  : grad_norm(parameters_);
      if (!std::isfinite(report.loss) || !std::isfinite(norm)) {
        const std::string what = "step " + std::to_string(step) + ": the loss is " + number_text(report.loss) +
                                 " and the gradient norm " + number_text(norm);
        if (settings_.on_divergence == OnDivergence::skip && ++skipped_in_a_row <= settings_.max_consecutive_skips) {
          learning_rate_scale_ *= 0.5;
          std::fprintf(stderr, "\n%swarning: %s: step skipped, learning rate scaled by %g from now on\n", label().c_str(), what.c_str(),
                       learning_rate_scale_);
          continue;
        }
        MOA_CHECK(false, "TrainingLoop", "training diverged at ", what, " (",
                  skipped_in_a_row > 1 ? "after skipping steps; " : "",
                  "lower the learning rate, or try --on-divergence skip); ", last_good_description());
      }
      skipped_in_a_row = 0;
      const std::string warning = watch.check(report.loss);
      if (!warning.empty())
        std::fprintf(stderr, "\n%swarning: step %lld: the loss %s %s (learning rate too high?)\n", label().c_str(), step,
                     number_text(report.loss).c_str(), warning.c_str());
      const double learning_rate = schedule_(step) * learning_rate_scale_;
      adam_.step(learning_rate);
      tokens += report.tokens;
      tokens_per_second_ = tokens / std::max(progress.seconds(), 1e-9);
      progress.update(step, step - first_step, report.loss, tokens_per_second_, learning_rate);
      std::vector<std::pair<std::string, double>> values{{"train_loss", report.loss}, {"grad_norm", norm}};
      values.insert(values.end(), report.values.begin(), report.values.end());
      values.push_back({"lr", learning_rate});
      values.push_back({"tokens_per_second", tokens_per_second_});
      if (step % settings_.valid_every == 0 || step == settings_.steps) {
        const auto validation = validate();
        MOA_CHECK(std::isfinite(validation.front().second), "TrainingLoop", "training diverged at step ", step, ": the ",
                  validation.front().first, " is ", number_text(validation.front().second), "; ",
                  last_good_description());
        values.insert(values.end(), validation.begin(), validation.end());
      }
      log.write(step, values);
      if (step % settings_.checkpoint_every == 0 || step == settings_.steps) save(step);
    }
  }

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
  long long last_good_step_ = 0;
};

}  // namespace moa_examples
