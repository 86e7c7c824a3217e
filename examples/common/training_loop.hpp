// examples/common/training_loop.hpp - the training loop the trainers share: batches per epoch
// fixed by the seed, Adam with a learning-rate schedule and gradient clipping, a metrics log and a
// progress line, validation and checkpoints on a schedule, and an exact resume.
//
// A trainer supplies what is its own: the training pairs (batched by tokens), one training step
// (forward, loss, backward; the loop zeroes the gradients before and updates after), and a
// validation. Everything else, including the checkpoint format and its metadata, is here once.
#pragma once

#include "training.hpp"

#include "moa/io/checkpoint.hpp"
#include "moa/optimizer.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/text/batching.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moa_examples {

using namespace moa;  // the examples are moa programs

struct TrainingSettings {
  std::string folder;            // checkpoint.safetensors and metrics.jsonl go here
  std::string config;            // the model's description; a checkpoint of another one is refused
  long long steps = 1000;        // train until this step
  long long valid_every = 100;   // validate every N steps and at the last
  long long checkpoint_every = 100;  // save every N steps and at the last
  std::uint64_t seed = 1;        // fixes the batches of every epoch
  Index batch_tokens = 2048;     // padded tokens per batch
  double clip_norm = 0.0;        // gradient clipping by global norm, 0 for none
  bool resume = false;           // continue from the folder's checkpoint when there is one
};

// What a training step reports: its loss, the tokens it trained on (for tokens/s), and any more
// values for the metrics log.
struct StepReport {
  double loss = 0.0;
  double tokens = 0.0;
  std::vector<std::pair<std::string, double>> values;
};

// The logged curves, read back from metrics.jsonl (so a resumed run has its whole history).
struct TrainingCurves {
  std::vector<double> steps, train_losses, valid_steps, valid_losses;
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

  // Loads the checkpoint when resuming; returns the step to continue from (0 for a fresh run).
  long long restore() {
    if (!settings_.resume || !std::filesystem::exists(checkpoint_path())) return 0;
    const std::string path = checkpoint_path();
    const auto metadata = load_checkpoint(path, parameters_, adam_, {{"config", settings_.config}});
    const long long step = metadata_integer(metadata, "step", path, 0, settings_.steps);
    MOA_CHECK(step == adam_.steps(), "resume", "'", path, "' is at step ", step, " but its optimizer at step ",
              adam_.steps());
    const std::string& rng_state = metadata_value(metadata, "rng", path);
    char* end = nullptr;
    errno = 0;
    const unsigned long long state = std::strtoull(rng_state.c_str(), &end, 10);
    MOA_CHECK(!rng_state.empty() && rng_state[0] != '-' && end == rng_state.c_str() + rng_state.size() && errno == 0,
              "resume", "'", path, "': metadata 'rng' = '", rng_state, "' is not a generator state");
    rng_.set_state(static_cast<std::uint64_t>(state));
    truncate_metrics(step);
    return step;
  }

  // Trains from `first_step` to settings.steps.
  void run(long long first_step, const std::vector<TokenPair>& train, const Step& train_step, const Validate& validate) {
    MetricsLog log(metrics_path(), first_step > 0);
    ProgressLine progress(settings_.steps);
    double tokens = 0;
    long long step = first_step;
    while (step < settings_.steps) {
      const Batch& batch = batch_for_step(train, step);
      ++step;
      parameters_.zero_grad();
      StepReport report = train_step(batch, rng_);
      if (settings_.clip_norm > 0) clip_grad_norm(parameters_, settings_.clip_norm);
      const double learning_rate = schedule_(step);
      adam_.step(learning_rate);
      tokens += report.tokens;
      tokens_per_second_ = tokens / std::max(progress.seconds(), 1e-9);
      progress.update(step, step - first_step, report.loss, tokens_per_second_, learning_rate);
      std::vector<std::pair<std::string, double>> values{{"train_loss", report.loss}};
      values.insert(values.end(), report.values.begin(), report.values.end());
      values.push_back({"lr", learning_rate});
      values.push_back({"tokens_per_second", tokens_per_second_});
      if (step % settings_.valid_every == 0 || step == settings_.steps) {
        const auto validation = validate();
        values.insert(values.end(), validation.begin(), validation.end());
      }
      log.write(step, values);
      if (step % settings_.checkpoint_every == 0 || step == settings_.steps) save(step);
    }
  }

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

  void save(long long step) {
    save_checkpoint(checkpoint_path(), parameters_, adam_,
                    {{"config", settings_.config}, {"step", std::to_string(step)}, {"rng", std::to_string(rng_.state())}},
                    DType::F32, sync_to_disk);
  }

  static const std::string& metadata_value(const std::map<std::string, std::string>& metadata, const std::string& key,
                                           const std::string& path) {
    const auto found = metadata.find(key);
    MOA_CHECK(found != metadata.end(), "resume", "'", path, "' has no '", key, "' in its metadata");
    return found->second;
  }

  // A whole decimal number in [low, high], or an error naming the file and the key.
  static long long metadata_integer(const std::map<std::string, std::string>& metadata, const std::string& key,
                                    const std::string& path, long long low, long long high) {
    const std::string& text = metadata_value(metadata, key, path);
    char* end = nullptr;
    errno = 0;
    const long long value = std::strtoll(text.c_str(), &end, 10);
    MOA_CHECK(!text.empty() && end == text.c_str() + text.size() && errno == 0, "resume", "'", path, "': metadata '",
              key, "' = '", text, "' is not a whole number");
    MOA_CHECK(value >= low && value <= high, "resume", "'", path, "': metadata '", key, "' = ", value,
              " is outside [", low, ", ", high, "] (is --steps smaller than the checkpoint's step?)");
    return value;
  }

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
};

}  // namespace moa_examples
