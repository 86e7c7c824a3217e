// moa/text/metrics.hpp - corpus BLEU and chrF for translation outputs.
//
// BLEU is computed as multi-bleu.perl does: text split on whitespace, n-gram precisions for n = 1..4
// with counts clipped by the reference and summed over the corpus, their geometric mean, and the
// brevity penalty exp(1 - r/c) when the hypotheses are shorter than the references. chrF is the
// character n-gram F-score (n = 1..6, beta = 2, spaces removed) with statistics summed over the
// corpus and precision and recall averaged over the orders, as sacreBLEU's default chrF2. Both
// are reported on a 0-100 scale; identical hypotheses and references give 100.
#pragma once

#include "moa/error.hpp"

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

inline double corpus_bleu(const std::vector<std::string>& hypotheses, const std::vector<std::string>& references) {
  MOA_CHECK(hypotheses.size() == references.size(), "corpus_bleu", "got ", hypotheses.size(), " hypotheses and ",
            references.size(), " references");
  double matches[4] = {0, 0, 0, 0}, totals[4] = {0, 0, 0, 0}, unused = 0;
  double hypothesis_length = 0, reference_length = 0;
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    const auto hypothesis = detail::split_whitespace(hypotheses[i]);
    const auto reference = detail::split_whitespace(references[i]);
    hypothesis_length += static_cast<double>(hypothesis.size());
    reference_length += static_cast<double>(reference.size());
    for (std::size_t order = 1; order <= 4; ++order)
      detail::add_ngram_statistics(hypothesis, reference, order, matches[order - 1], totals[order - 1], unused);
  }
  double log_precision = 0;
  for (int n = 0; n < 4; ++n) {
    if (matches[n] == 0 || totals[n] == 0) return 0.0;
    log_precision += std::log(matches[n] / totals[n]) / 4.0;
  }
  const double brevity =
      hypothesis_length < reference_length ? std::exp(1.0 - reference_length / hypothesis_length) : 1.0;
  return 100.0 * brevity * std::exp(log_precision);
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
