// examples/common/training.hpp - pieces of a training program: a live progress line, a JSON-lines metrics log,
// and per-expert token statistics with pointwise mutual information. Standard library only.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace moa_examples {

using namespace moa;  // the examples are moa programs

// Forces a finished checkpoint file to the disk before it replaces the previous one (see
// moa::SyncFile), where the platform can.
inline bool sync_to_disk(std::FILE* file) {
#if __has_include(<unistd.h>)
  return ::fsync(::fileno(file)) == 0;
#else
  (void)file;
  return true;
#endif
}

// "[MoA] step 120/2000 | loss 4.213 | 8.1k tok/s | lr 3.0e-04 | ETA 3m52s", redrawn in place on a
// terminal and printed as a plain line every `plain_every` steps otherwise (logs, CI, or two runs
// sharing one terminal: `plain`).
class ProgressLine {
 public:
  ProgressLine(long long total_steps, std::string label = {}, bool plain = false, long long plain_every = 100)
      : total_(total_steps), plain_every_(plain_every), label_(label.empty() ? "" : "[" + label + "] "),
        start_(std::chrono::steady_clock::now()) {
#if __has_include(<unistd.h>)
    terminal_ = !plain && ::isatty(::fileno(stderr)) != 0;
#else
    (void)plain;
#endif
  }

  void update(long long step, long long steps_this_run, double loss, double tokens_per_second, double learning_rate) {
    const double elapsed = seconds();
    const double per_step = steps_this_run > 0 ? elapsed / static_cast<double>(steps_this_run) : 0.0;
    const long long eta = static_cast<long long>(per_step * static_cast<double>(total_ - step));
    char line[200];
    std::snprintf(line, sizeof line, "%sstep %lld/%lld | loss %.3f | %.1fk tok/s | lr %.1e | ETA %lldm%02llds",
                  label_.c_str(), step, total_, loss, tokens_per_second / 1000.0, learning_rate, eta / 60, eta % 60);
    if (terminal_) {
      std::fprintf(stderr, "\r%-90s", line);
      if (step == total_) std::fprintf(stderr, "\n");
    } else if (step % plain_every_ == 0 || step == total_) {
      std::fprintf(stderr, "%s\n", line);
    }
    std::fflush(stderr);
  }

  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  long long total_;
  long long plain_every_;
  std::string label_;
  bool terminal_ = false;
  std::chrono::steady_clock::time_point start_;
};

// One JSON object per line: {"step": 100, "train_loss": 3.2, ...}. Appends, so a resumed run
// continues its file.
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path, bool append) : file_(path, append ? std::ios::app : std::ios::trunc) {
    MOA_CHECK(file_.good(), "MetricsLog", "cannot write '", path, "'");
  }

  void write(long long step, const std::vector<std::pair<std::string, double>>& values) {
    file_ << "{\"step\": " << step;
    for (const auto& [name, value] : values) {
      char number[40];
      std::snprintf(number, sizeof number, "%.9g", value);
      file_ << ", \"" << name << "\": " << (std::isfinite(value) ? number : "null");
    }
    file_ << "}\n";
    file_.flush();
  }

 private:
  std::ofstream file_;
};

// Counts of (token, expert) assignments for one routed layer, and the PMI table of the paper:
// PMI(token, expert) = log p(token, expert) / (p(token) p(expert)).
class ExpertTokenStatistics {
 public:
  explicit ExpertTokenStatistics(Index num_experts) : expert_totals_(static_cast<std::size_t>(num_experts), 0) {}

  // tokens: one id per query row; experts and rows: [A], assignment a of expert experts[a] (-1:
  // none) to query row rows[a] (a Router's experts() and tokens()).
  void add(const TokenIds& tokens, const std::vector<Index>& experts, const std::vector<Index>& rows) {
    MOA_CHECK(experts.size() == rows.size(), "ExpertTokenStatistics::add", "got ", experts.size(), " experts for ",
              rows.size(), " assignment rows");
    for (std::size_t a = 0; a < experts.size(); ++a) {
      const Index expert = experts[a], row = rows[a];
      if (expert < 0) continue;
      MOA_CHECK(expert < static_cast<Index>(expert_totals_.size()), "ExpertTokenStatistics::add", "expert ", expert,
                " is outside [0, ", expert_totals_.size(), ")");
      MOA_CHECK(row >= 0 && row < static_cast<Index>(tokens.size()), "ExpertTokenStatistics::add", "row ", row,
                " is outside [0, ", tokens.size(), ")");
      ++joint_[{tokens[static_cast<std::size_t>(row)], expert}];
      ++token_totals_[tokens[static_cast<std::size_t>(row)]];
      ++expert_totals_[static_cast<std::size_t>(expert)];
      ++total_;
    }
  }

  long long total() const { return total_; }
  // Share of the assignments that went to each expert.
  std::vector<double> loads() const {
    std::vector<double> loads;
    for (long long count : expert_totals_) loads.push_back(total_ > 0 ? static_cast<double>(count) / total_ : 0.0);
    return loads;
  }

  struct Entry {
    Index token;
    double pmi;
    long long count;
  };

  // Mutual information between token and expert over the assignments, in nats:
  // sum over (token, expert) of p(token, expert) log p(token, expert) / (p(token) p(expert)).
  // 0 when routing ignores the token; it is biased upward on a finite sample, so compare it with
  // the same statistic over shuffled tokens.
  double mutual_information() const {
    double information = 0.0;
    for (const auto& [key, count] : joint_) {
      const double joint = static_cast<double>(count) / total_;
      const double token_share = static_cast<double>(token_totals_.at(key.first)) / total_;
      const double expert_share = static_cast<double>(expert_totals_[static_cast<std::size_t>(key.second)]) / total_;
      information += joint * std::log(joint / (token_share * expert_share));
    }
    return information;
  }

  // The `top` tokens with the highest PMI for `expert`, among tokens seen at least min_count times.
  std::vector<Entry> top_tokens(Index expert, std::size_t top, long long min_count) const {
    MOA_CHECK(expert >= 0 && expert < static_cast<Index>(expert_totals_.size()), "ExpertTokenStatistics::top_tokens",
              "expert ", expert, " is outside [0, ", expert_totals_.size(), ")");
    std::vector<Entry> entries;
    if (expert_totals_[static_cast<std::size_t>(expert)] == 0) return entries;  // no assignment: no PMI
    const double expert_share = static_cast<double>(expert_totals_[static_cast<std::size_t>(expert)]) / total_;
    std::vector<long long> token_counts;  // beside entries: each token's total assignments
    for (const auto& [key, count] : joint_) {
      const long long token_total = token_totals_.at(key.first);
      if (key.second != expert || token_total < min_count) continue;
      const double joint = static_cast<double>(count) / total_;
      const double token_share = static_cast<double>(token_total) / total_;
      entries.push_back({key.first, std::log(joint / (token_share * expert_share)), count});
      token_counts.push_back(token_total);
    }
    // For one expert PMI orders as count / token_total, compared exactly in integers (the logs of
    // equal ratios may differ in the last bit). A token always routed to the expert reaches the
    // largest PMI, log 1 / (k p(expert)); among equal PMI the more frequent token comes first.
    std::vector<std::size_t> order(entries.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      const long long left = entries[a].count * token_counts[b], right = entries[b].count * token_counts[a];
      if (left != right) return left > right;
      return entries[a].count != entries[b].count ? entries[a].count > entries[b].count : entries[a].token < entries[b].token;
    });
    std::vector<Entry> sorted;
    for (std::size_t i : order) sorted.push_back(entries[i]);
    entries = std::move(sorted);
    if (entries.size() > top) entries.resize(top);
    return entries;
  }

 private:
  std::map<std::pair<Index, Index>, long long> joint_;
  std::map<Index, long long> token_totals_;
  std::vector<long long> expert_totals_;
  long long total_ = 0;
};

}  // namespace moa_examples
