// examples/common/parallel_corpus.hpp - the German-English pairs the trainers learn from: Ding's
// dictionary sentences (ding.hpp) and LibreOffice's help (libreoffice_help.hpp), combined, with
// each pair's origin kept so results can be reported per corpus.
//
// The train/valid/test split is a hash of the German side alone, so a source sentence that occurs
// twice (the help repeats itself, with different translations) never lands on two sides.
#pragma once

#include "ding.hpp"
#include "libreoffice_help.hpp"

#include "moa/error.hpp"

#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

namespace moa_examples {

enum class Corpus { ding, libreoffice };

inline const char* corpus_name(Corpus corpus) { return corpus == Corpus::ding ? "ding" : "libreoffice"; }

struct CorpusPair {
  SentencePair pair;
  Corpus corpus;
};

struct ParallelCorpusOptions {
  bool ding = true;
  bool libreoffice = true;
  std::string ding_path = "/usr/share/trans/de-en";
  std::string help_root = "/usr/share/libreoffice/help";
  DingOptions ding_options;   // phrases, sentences; its max_words is replaced by the one below
  std::size_t max_words = 0;  // on either side, for both corpora; 0 = no limit
};

// Chooses the corpora from a comma-separated list such as "ding,libreoffice" (a trainer's --corpora).
inline void choose_corpora(ParallelCorpusOptions& options, const std::string& list) {
  options.ding = options.libreoffice = false;
  for (const std::string& name : detail::split_on(list, ",")) {
    MOA_CHECK(name == "ding" || name == "libreoffice", "--corpora",
              "expected a comma-separated list of ding and libreoffice, got '", list, "'");
    (name == "ding" ? options.ding : options.libreoffice) = true;
  }
}

// What is wrong with a --corpora list, or nothing (for a command-line validator).
inline std::string corpora_error(const std::string& list) {
  try {
    ParallelCorpusOptions probe;
    choose_corpora(probe, list);
    return {};
  } catch (const moa::Error&) {
    return "expected ding, libreoffice or ding,libreoffice, got '" + list + "'";
  }
}

enum class Split { train, valid, test };

// 2% valid, 3% test, the rest train, by a hash (FNV-1a of the UTF-8 bytes) of the text, so the
// split is the same on every machine. 3% of the demo's data is over 1,000 test pairs.
inline Split split_of(const std::string& text) {
  std::uint64_t hash = 14695981039346656037ULL;
  for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ULL;
  const std::uint64_t bucket = hash % 100;
  return bucket < 2 ? Split::valid : bucket < 5 ? Split::test : Split::train;
}

// Train, valid and test pairs, each in corpus order (Ding first); a pair found in both corpora is
// kept once, as Ding's.
inline std::array<std::vector<CorpusPair>, 3> load_parallel_corpus(const ParallelCorpusOptions& options) {
  MOA_CHECK(options.ding || options.libreoffice, "load_parallel_corpus", "no corpus chosen");
  std::array<std::vector<CorpusPair>, 3> splits;
  std::set<SentencePair> seen;
  auto add = [&](std::vector<SentencePair> pairs, Corpus corpus) {
    for (SentencePair& pair : pairs) {
      if (options.max_words > 0 && (detail::count_words(pair.source) > options.max_words ||
                                    detail::count_words(pair.target) > options.max_words))
        continue;
      if (!seen.insert(pair).second) continue;
      const Split split = split_of(pair.source);
      splits[static_cast<std::size_t>(split)].push_back({std::move(pair), corpus});
    }
  };
  if (options.ding) {
    DingOptions ding = options.ding_options;
    ding.max_words = options.max_words;
    add(load_ding(options.ding_path, ding), Corpus::ding);
  }
  if (options.libreoffice) add(load_libreoffice_help(options.help_root), Corpus::libreoffice);
  return splits;
}

}  // namespace moa_examples
