// moa/text/metrics.hpp - corpus BLEU and chrF for translation outputs.
//
// BLEU is computed as multi-bleu.perl does: text split on whitespace, n-gram precisions for n = 1..4
// with counts clipped by the reference and summed over the corpus, their geometric mean, and the
// brevity penalty exp(1 - r/c) when the hypotheses are shorter than the references. chrF is the
// character n-gram F-score (n = 1..6, beta = 2, spaces removed) with statistics summed over the
// corpus and precision and recall averaged over the orders, as sacreBLEU's default chrF2. Both
// are reported on a 0-100 scale; identical hypotheses and references give 100. BLEU comes with a
// bootstrap confidence interval and sacreBLEU's paired bootstrap test between two systems.
#pragma once

#include "moa/error.hpp"
#include "moa/random.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace moa {

namespace detail {

inline std::vector<std::string> split_whitespace(const std::string& text) {
  std::istringstream stream(text);
  std::vector<std::string> words;
  for (std::string word; stream >> word;) words.push_back(word);
  return words;
}

// Counts of the n-grams of `units` (words or characters), keyed by their joined text.
template <typename Unit>
std::map<std::vector<Unit>, long> ngram_counts(const std::vector<Unit>& units, std::size_t order) {
  std::map<std::vector<Unit>, long> counts;
  for (std::size_t i = 0; i + order <= units.size(); ++i)
    ++counts[std::vector<Unit>(units.begin() + static_cast<std::ptrdiff_t>(i),
                               units.begin() + static_cast<std::ptrdiff_t>(i + order))];
  return counts;
}

// Adds the matches (clipped by the reference), hypothesis n-grams and reference n-grams of one order.
template <typename Unit>
void add_ngram_statistics(const std::vector<Unit>& hypothesis, const std::vector<Unit>& reference, std::size_t order,
                          double& matches, double& hypothesis_total, double& reference_total) {
  const auto hypothesis_counts = ngram_counts(hypothesis, order);
  const auto reference_counts = ngram_counts(reference, order);
  for (const auto& [ngram, count] : hypothesis_counts) {
    hypothesis_total += static_cast<double>(count);
    const auto found = reference_counts.find(ngram);
    if (found != reference_counts.end()) matches += static_cast<double>(std::min(count, found->second));
  }
  for (const auto& entry : reference_counts) reference_total += static_cast<double>(entry.second);
}

// UTF-8 code points of `text`, spaces removed.
inline std::vector<std::string> characters_without_spaces(const std::string& text) {
  std::vector<std::string> characters;
  for (std::size_t i = 0; i < text.size();) {
    const unsigned char lead = static_cast<unsigned char>(text[i]);
    const std::size_t width = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
    const std::string character = text.substr(i, width);
    if (character != " " && character != "\t" && character != "\n") characters.push_back(character);
    i += width;
  }
  return characters;
}

}  // namespace detail

// BLEU's sufficient statistics: n-gram matches and totals for n = 1..4 and the two lengths. They
// add over sentences, and corpus BLEU is a function of their sum, so resampling sentences (the
// bootstrap) costs additions only.
struct BleuStatistics {
  double matches[4] = {0, 0, 0, 0};
  double totals[4] = {0, 0, 0, 0};
  double hypothesis_length = 0;
  double reference_length = 0;

  BleuStatistics& operator+=(const BleuStatistics& other) {
    for (int n = 0; n < 4; ++n) {
      matches[n] += other.matches[n];
      totals[n] += other.totals[n];
    }
    hypothesis_length += other.hypothesis_length;
    reference_length += other.reference_length;
    return *this;
  }

  // BLEU on the 0-100 scale; 0 when some order has no match.
  double score() const {
    double log_precision = 0;
    for (int n = 0; n < 4; ++n) {
      if (matches[n] == 0 || totals[n] == 0) return 0.0;
      log_precision += std::log(matches[n] / totals[n]) / 4.0;
    }
    const double brevity =
        hypothesis_length < reference_length ? std::exp(1.0 - reference_length / hypothesis_length) : 1.0;
    return 100.0 * brevity * std::exp(log_precision);
  }
};

// One BleuStatistics per sentence pair.
inline std::vector<BleuStatistics> bleu_statistics(const std::vector<std::string>& hypotheses,
                                                   const std::vector<std::string>& references) {
  MOA_CHECK(hypotheses.size() == references.size(), "bleu_statistics", "got ", hypotheses.size(),
            " hypotheses and ", references.size(), " references");
  std::vector<BleuStatistics> statistics(hypotheses.size());
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    const auto hypothesis = detail::split_whitespace(hypotheses[i]);
    const auto reference = detail::split_whitespace(references[i]);
    BleuStatistics& sentence = statistics[i];
    sentence.hypothesis_length = static_cast<double>(hypothesis.size());
    sentence.reference_length = static_cast<double>(reference.size());
    double unused = 0;
    for (std::size_t order = 1; order <= 4; ++order)
      detail::add_ngram_statistics(hypothesis, reference, order, sentence.matches[order - 1],
                                   sentence.totals[order - 1], unused);
  }
  return statistics;
}

inline double corpus_bleu(const std::vector<std::string>& hypotheses, const std::vector<std::string>& references) {
  MOA_CHECK(hypotheses.size() == references.size(), "corpus_bleu", "got ", hypotheses.size(), " hypotheses and ",
            references.size(), " references");
  BleuStatistics total;
  for (const BleuStatistics& sentence : bleu_statistics(hypotheses, references)) total += sentence;
  return total.score();
}

// A score with its bootstrap distribution: the mean of the resampled scores and the 95% interval
// between their 2.5th and 97.5th percentiles (the same order statistics as sacreBLEU's).
struct BootstrapEstimate {
  double score = 0;  // on the whole test set
  double mean = 0;
  double lower = 0;
  double upper = 0;
};

// Two systems on the same sentences, resampled together: each one's estimate, and the p-value of
// the difference as sacreBLEU's paired bootstrap computes it: the share of resamples whose
// |difference|, centred on its mean over the resamples, exceeds the observed |difference|, with
// +1 in numerator and denominator (and 1 when the systems score the same). A small p says the
// difference is unlikely to be chance.
struct PairedBootstrap {
  BootstrapEstimate system, baseline;
  double p_value = 1;
};

namespace detail {

inline BootstrapEstimate bootstrap_estimate(double score, std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  const std::size_t count = samples.size(), low = count / 40, high = count - low - 1;
  double sum = 0;
  for (double sample : samples) sum += sample;
  return {score, sum / static_cast<double>(count), samples[low], samples[high]};
}

// Corpus BLEU of `samples` resamples (sentences drawn with replacement) of each system; every
// system sees the same resampled sentences.
inline std::vector<std::vector<double>> bootstrap_bleu_samples(const std::vector<std::vector<BleuStatistics>>& systems,
                                                               Rng& rng, int samples) {
  const std::size_t sentences = systems.front().size();
  std::vector<std::vector<double>> scores(systems.size(), std::vector<double>(static_cast<std::size_t>(samples)));
  std::vector<BleuStatistics> totals(systems.size());
  for (int sample = 0; sample < samples; ++sample) {
    std::fill(totals.begin(), totals.end(), BleuStatistics{});
    for (std::size_t draw = 0; draw < sentences; ++draw) {
      const std::size_t sentence = static_cast<std::size_t>(rng.below(sentences));
      for (std::size_t s = 0; s < systems.size(); ++s) totals[s] += systems[s][sentence];
    }
    for (std::size_t s = 0; s < systems.size(); ++s) scores[s][static_cast<std::size_t>(sample)] = totals[s].score();
  }
  return scores;
}

inline void check_bootstrap(const char* function, std::size_t hypotheses, std::size_t references, int samples) {
  MOA_CHECK(hypotheses == references, function, "got ", hypotheses, " hypotheses and ", references, " references");
  MOA_CHECK(hypotheses > 0, function, "needs at least one sentence");
  MOA_CHECK(samples >= 40, function, "samples must be at least 40 for a 95% interval, got ", samples);
}

}  // namespace detail

// Corpus BLEU with a 95% bootstrap interval over `samples` resamples of the sentences, drawn
// from `rng` (the same seed gives the same interval).
inline BootstrapEstimate bootstrap_bleu(const std::vector<std::string>& hypotheses,
                                        const std::vector<std::string>& references, Rng& rng, int samples = 1000) {
  detail::check_bootstrap("bootstrap_bleu", hypotheses.size(), references.size(), samples);
  const auto statistics = bleu_statistics(hypotheses, references);
  auto scores = detail::bootstrap_bleu_samples({statistics}, rng, samples);
  return detail::bootstrap_estimate(corpus_bleu(hypotheses, references), std::move(scores[0]));
}

// sacreBLEU's paired bootstrap (paired-bs) of BLEU: `system` against `baseline` on the same
// references.
inline PairedBootstrap paired_bootstrap_bleu(const std::vector<std::string>& system,
                                             const std::vector<std::string>& baseline,
                                             const std::vector<std::string>& references, Rng& rng,
                                             int samples = 1000) {
  const char* function = "paired_bootstrap_bleu";
  detail::check_bootstrap(function, system.size(), references.size(), samples);
  MOA_CHECK(baseline.size() == system.size(), function, "got ", system.size(), " system and ", baseline.size(),
            " baseline hypotheses");
  auto scores = detail::bootstrap_bleu_samples({bleu_statistics(system, references), bleu_statistics(baseline, references)},
                                               rng, samples);
  PairedBootstrap result;
  const double system_score = corpus_bleu(system, references), baseline_score = corpus_bleu(baseline, references);
  const double observed = std::abs(system_score - baseline_score);
  std::vector<double> differences(static_cast<std::size_t>(samples));
  double mean_difference = 0;
  for (std::size_t i = 0; i < differences.size(); ++i) {
    differences[i] = std::abs(scores[0][i] - scores[1][i]);
    mean_difference += differences[i] / static_cast<double>(samples);
  }
  std::size_t beyond = 0;
  for (double difference : differences) beyond += difference - mean_difference > observed ? 1 : 0;
  // No observed difference leaves nothing to test: p = 1 (sacreBLEU's formula would give its
  // smallest p here).
  result.p_value = observed == 0.0 ? 1.0 : static_cast<double>(beyond + 1) / static_cast<double>(samples + 1);
  result.system = detail::bootstrap_estimate(system_score, std::move(scores[0]));
  result.baseline = detail::bootstrap_estimate(baseline_score, std::move(scores[1]));
  return result;
}

inline double corpus_chrf(const std::vector<std::string>& hypotheses, const std::vector<std::string>& references,
                          int max_order = 6, double beta = 2.0) {
  MOA_CHECK(hypotheses.size() == references.size(), "corpus_chrf", "got ", hypotheses.size(), " hypotheses and ",
            references.size(), " references");
  MOA_CHECK(max_order > 0 && beta > 0, "corpus_chrf", "max_order and beta must be positive");
  std::vector<double> matches(static_cast<std::size_t>(max_order), 0.0), hypothesis_totals(matches), reference_totals(matches);
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    const auto hypothesis = detail::characters_without_spaces(hypotheses[i]);
    const auto reference = detail::characters_without_spaces(references[i]);
    for (int order = 1; order <= max_order; ++order)
      detail::add_ngram_statistics(hypothesis, reference, static_cast<std::size_t>(order), matches[order - 1],
                                   hypothesis_totals[order - 1], reference_totals[order - 1]);
  }
  double precision = 0, recall = 0;
  int orders = 0;
  for (int n = 0; n < max_order; ++n) {
    if (hypothesis_totals[n] == 0 && reference_totals[n] == 0) continue;  // no n-grams of this order anywhere
    precision += hypothesis_totals[n] > 0 ? matches[n] / hypothesis_totals[n] : 0.0;
    recall += reference_totals[n] > 0 ? matches[n] / reference_totals[n] : 0.0;
    ++orders;
  }
  if (orders == 0) return 0.0;
  precision /= orders;
  recall /= orders;
  if (precision == 0 && recall == 0) return 0.0;
  const double beta2 = beta * beta;
  return 100.0 * (1 + beta2) * precision * recall / (beta2 * precision + recall);
}

}  // namespace moa
