// The trainers' flag checks: validators with messages a person reads ("--model-dim: must be a
// whole number in [1, 65536], got -5"), a memory estimate checked before a model is allocated, and
// the rule for a tokenizer already in the output folder.
#pragma once

#include "moa/error.hpp"
#include "moa/models/attention_spec.hpp"

#include <CLI/CLI.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace moa_examples {

// A whole number in [low, high], written as such: no sign trickery, no overflow, no fraction.
inline CLI::Validator whole_number(long long low, long long high) {
  const std::string range = "[" + std::to_string(low) + ", " + std::to_string(high) + "]";
  return CLI::Validator(
      [low, high, range](std::string& text) -> std::string {
        char* end = nullptr;
        errno = 0;
        const long long value = std::strtoll(text.c_str(), &end, 10);
        if (text.empty() || end != text.c_str() + text.size() || errno == ERANGE || value < low || value > high)
          return "must be a whole number in " + range + ", got " + text;
        return {};
      },
      "INT in " + range);
}

// A seed: any whole number from 0 to 2^64 - 1 (a minus sign is refused, not wrapped around).
inline CLI::Validator seed_number() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        char* end = nullptr;
        errno = 0;
        std::strtoull(text.c_str(), &end, 10);
        if (text.empty() || text[0] == '-' || text[0] == '+' || end != text.c_str() + text.size() || errno == ERANGE)
          return "must be a whole number in [0, 18446744073709551615], got " + text;
        return {};
      },
      "UINT64");
}

// A finite real number in [low, high] (NaN and infinities refused); `open_low` excludes low itself.
inline CLI::Validator real_number(double low, double high, bool open_low = false) {
  char range[80];
  std::snprintf(range, sizeof range, "%s%g, %g]", open_low ? "(" : "[", low, high);
  const std::string range_text = range;
  return CLI::Validator(
      [low, high, open_low, range_text](std::string& text) -> std::string {
        char* end = nullptr;
        const double value = std::strtod(text.c_str(), &end);
        const bool inside = open_low ? value > low : value >= low;
        if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(value) || !inside || value > high)
          return "must be a number in " + range_text + ", got " + text;
        return {};
      },
      "NUMBER in " + range_text);
}

// Above this many steps a run is a typo, not a plan.
constexpr long long kMaxSteps = 1'000'000'000'000LL;

// The flags both trainers take, on an Options with these fields of these names.
template <typename Options>
void add_training_flags(CLI::App& app, Options& options, const std::string& layers_help) {
  app.add_option("--seed", options.seed, "random seed")->capture_default_str()->check(seed_number());
  app.add_option("--steps", options.steps, "training steps")->capture_default_str()->check(whole_number(1, kMaxSteps));
  app.add_option("--batch-tokens", options.batch_tokens, "padded tokens per batch")->capture_default_str()
      ->check(whole_number(8, 1 << 24));
  app.add_option("--lr", options.learning_rate, "peak learning rate")->capture_default_str()
      ->check(real_number(0.0, 1e30, true));
  app.add_option("--warmup", options.warmup, "linear warm-up steps")->capture_default_str()
      ->check(whole_number(0, kMaxSteps));
  app.add_option("--dropout", options.dropout, "dropout")->capture_default_str()->check(real_number(0.0, 0.95));
  app.add_option("--model-dim", options.model_dim, "d_model")->capture_default_str()->check(whole_number(1, 65536));
  app.add_option("--ffn-dim", options.ffn_dim, "feed-forward width")->capture_default_str()
      ->check(whole_number(1, 1 << 20));
  app.add_option("--layers", options.layers, layers_help)->capture_default_str()->check(whole_number(1, 1000));
  app.add_option("--vocab-size", options.vocab_size, "SentencePiece vocabulary (the corpus may give fewer)")
      ->capture_default_str()
      ->check(whole_number(16, 1000000));
  app.add_option("--max-tokens", options.max_tokens, "drop sequences this long or longer")->capture_default_str()
      ->check(whole_number(2, 100000));
  app.add_flag("--resume", options.resume, "continue from the checkpoints in the output folder");
  app.add_flag("--reuse-tokenizer", options.reuse_tokenizer,
               "use the tokenizer in the output folder even if it was trained with other flags");
  app.add_option("--valid-every", options.valid_every, "validation every N steps")->capture_default_str()
      ->check(whole_number(1, kMaxSteps));
  app.add_option("--on-divergence", options.on_divergence,
                 "a loss or gradient that is not finite: stop, or skip the step and halve the learning rate")
      ->capture_default_str()
      ->check(CLI::IsMember({"stop", "skip"}));
  options.compute.add_to(app);
}

// The machine's memory in bytes (0 when unknown).
inline double physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return static_cast<double>(pages) * static_cast<double>(page);
#endif
  return 0.0;
}

inline std::string bytes_text(double bytes) {
  char text[64];
  if (bytes >= 1e18) {
    std::snprintf(text, sizeof text, "%.2g bytes", bytes);
    return text;
  }
  const char* units[] = {"B", "KB", "MB", "GB", "TB", "PB"};
  int unit = 0;
  while (bytes >= 1000.0 && unit < 5) {
    bytes /= 1000.0;
    ++unit;
  }
  std::snprintf(text, sizeof text, "%.1f %s", bytes, units[unit]);
  return text;
}

// What a model of `parameters` parameters training on batches of `batch_tokens` tokens needs, in
// float: each parameter with its gradient and Adam's two moments (16 bytes), and the activations
// each layer keeps for backward (`activations_per_token` floats a token). Refused with a message
// when it exceeds the machine's memory, before anything is allocated.
inline void check_memory(const char* program, double parameters, double batch_tokens, double activations_per_token) {
  const double needed = 16.0 * parameters + 4.0 * batch_tokens * activations_per_token;
  const double available = physical_memory_bytes();
  MOA_CHECK(available <= 0.0 || needed <= available, program, "this model needs about ", bytes_text(needed),
            " (", parameters, " parameters with gradients and Adam state, and activations of ", batch_tokens,
            "-token batches), more than this machine's ", bytes_text(available));
}

// Parameters of one attention layer of `spec` in a model of width model_dim.
inline double attention_parameters(const moa::AttentionSpec& spec, double model_dim) {
  const double head_dim = static_cast<double>(spec.head_dim);
  if (spec.kind == moa::AttentionSpec::Kind::moa) {
    const double experts = static_cast<double>(spec.num_experts);
    return 2.0 * experts * head_dim * model_dim + 2.0 * head_dim * model_dim + experts * model_dim;
  }
  if (spec.kind == moa::AttentionSpec::Kind::moh) {
    const double heads = static_cast<double>(spec.shared_heads + spec.num_heads);
    return 4.0 * heads * head_dim * model_dim + (heads + 2.0) * model_dim;  // and its routers
  }
  return 4.0 * static_cast<double>(spec.num_heads) * head_dim * model_dim;
}

// Floats per token an attention layer of `spec` keeps for backward, over `keys` keys: the queries,
// attention probabilities and outputs of its heads (k of them for MoA, h_s + k for MoH) and a few
// d_model rows.
inline double attention_activations(const moa::AttentionSpec& spec, double model_dim, double keys) {
  const double heads = static_cast<double>(spec.active_heads());
  return heads * (2.0 * static_cast<double>(spec.head_dim) + keys) + 4.0 * model_dim;
}

// A tokenizer already in the output folder (<prefix>.model) is reused only when it was trained
// with the same flags, recorded beside it in <prefix>.flags, or when --reuse-tokenizer says so;
// otherwise the run stops and says how to go on. A tokenizer from before the flags were recorded
// is reused when its vocabulary has the size asked for (`vocabulary_of` reads it), and the flags
// are recorded then. Returns true when the tokenizer is to be trained.
template <typename VocabularyOf>
bool tokenizer_needs_training(const char* program, const std::string& prefix, const std::string& flags, bool reuse,
                              long long requested_vocabulary, VocabularyOf&& vocabulary_of) {
  const std::string model = prefix + ".model", record = prefix + ".flags";
  std::error_code error;
  if (!std::filesystem::exists(model, error)) return true;
  std::string recorded;
  {
    std::ifstream file(record);
    std::getline(file, recorded);
  }
  if (recorded.empty() && static_cast<long long>(vocabulary_of(model)) == requested_vocabulary) {
    std::fprintf(stderr, "%s: note: reusing the tokenizer '%s' (its vocabulary has the size asked for)\n", program,
                 model.c_str());
    std::ofstream(record) << flags << '\n';
    return false;
  }
  MOA_CHECK(reuse || recorded == flags, program, "the output folder already has a tokenizer, '", model,
            "', trained with ", recorded.empty() ? std::string("unrecorded flags") : "'" + recorded + "'",
            ", but this run asks for '", flags, "': use another --output, delete '", model,
            "' to train a new one, or pass --reuse-tokenizer to use it as it is");
  if (recorded != flags)
    std::fprintf(stderr, "%s: note: reusing the tokenizer '%s' (trained with %s)\n", program, model.c_str(),
                 recorded.empty() ? "unrecorded flags" : recorded.c_str());
  return false;
}

// Records the flags a new tokenizer was trained with, and reports a vocabulary smaller than asked
// (SentencePiece stops where the corpus runs out of pieces).
inline void record_tokenizer(const char* program, const std::string& prefix, const std::string& flags,
                             long long requested, long long obtained) {
  std::ofstream(prefix + ".flags") << flags << '\n';
  if (obtained != requested)
    std::fprintf(stderr, "%s: note: the corpus gives a vocabulary of %lld pieces, not the %lld asked for\n", program,
                 obtained, requested);
}

}  // namespace moa_examples
