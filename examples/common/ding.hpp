// examples/common/ding.hpp - German-English pairs from the Ding dictionary (Debian package trans-de-en).
//
// A line is "German :: English". Alternatives are separated by " | " in the same order on both
// sides, synonyms within an alternative by ";". Annotations in {}, [], (), // and <> are dropped.
// Each alternative gives one pair: its first German and first English synonym. A line whose two
// sides have different numbers of alternatives is skipped.
#pragma once

#include "moa/error.hpp"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace moa_examples {

using namespace moa;  // the examples are moa programs

struct SentencePair {
  std::string source;  // German
  std::string target;  // English
  bool operator<(const SentencePair& other) const {
    return source != other.source ? source < other.source : target < other.target;
  }
};

namespace detail {

inline std::vector<std::string> split_on(const std::string& text, const std::string& separator) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (std::size_t found; (found = text.find(separator, start)) != std::string::npos; start = found + separator.size())
    parts.push_back(text.substr(start, found - start));
  parts.push_back(text.substr(start));
  return parts;
}

// Drops annotations in {}, [], (), // and <> (an opener without its closer is kept as text) and
// folds spaces.
inline std::string strip_annotations(const std::string& text) {
  std::string kept;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const char closer = c == '{' ? '}' : c == '[' ? ']' : c == '(' ? ')' : c == '<' ? '>' : c == '/' ? '/' : 0;
    const std::size_t end = closer != 0 ? text.find(closer, i + 1) : std::string::npos;
    if (end != std::string::npos) {
      i = end;
      continue;
    }
    kept += c;
  }
  std::string folded;
  for (char c : kept) {
    const bool space = c == ' ' || c == '\t' || c == '\r';
    if (space && (folded.empty() || folded.back() == ' ')) continue;
    folded += space ? ' ' : c;
  }
  while (!folded.empty() && folded.back() == ' ') folded.pop_back();
  return folded;
}

inline std::string first_synonym(const std::string& alternative) {
  for (const std::string& synonym : split_on(alternative, ";")) {
    const std::string cleaned = strip_annotations(synonym);
    if (!cleaned.empty()) return cleaned;
  }
  return {};
}

inline std::size_t count_words(const std::string& text) {
  std::size_t words = 0;
  bool in_word = false;
  for (char c : text) {
    const bool space = c == ' ';
    if (!space && !in_word) ++words;
    in_word = !space;
  }
  return words;
}

}  // namespace detail

// The pairs of one dictionary line; empty for comments and lines whose sides do not align.
inline std::vector<SentencePair> parse_ding_line(const std::string& line) {
  if (line.empty() || line[0] == '#') return {};
  const std::size_t separator = line.find(" :: ");
  if (separator == std::string::npos) return {};
  const auto german = detail::split_on(line.substr(0, separator), " | ");
  const auto english = detail::split_on(line.substr(separator + 4), " | ");
  if (german.size() != english.size()) return {};
  std::vector<SentencePair> pairs;
  for (std::size_t i = 0; i < german.size(); ++i) {
    SentencePair pair{detail::first_synonym(german[i]), detail::first_synonym(english[i])};
    if (!pair.source.empty() && !pair.target.empty()) pairs.push_back(std::move(pair));
  }
  return pairs;
}

// A whole sentence: both sides end with '.', '!' or '?'.
inline bool is_sentence(const SentencePair& pair) {
  auto ends_sentence = [](const std::string& text) {
    return !text.empty() && (text.back() == '.' || text.back() == '!' || text.back() == '?');
  };
  return ends_sentence(pair.source) && ends_sentence(pair.target);
}

struct DingOptions {
  bool phrases = true;        // keep pairs that are not whole sentences
  bool sentences = true;      // keep whole sentences
  std::size_t max_words = 0;  // on either side; 0 = no limit
};

// The distinct pairs of a Ding file's text, in file order, filtered by the options.
inline std::vector<SentencePair> read_ding(std::istream& text, const DingOptions& options = {}) {
  std::vector<SentencePair> pairs;
  std::set<SentencePair> seen;
  for (std::string line; std::getline(text, line);) {
    for (SentencePair& pair : parse_ding_line(line)) {
      const bool sentence = is_sentence(pair);
      if ((sentence && !options.sentences) || (!sentence && !options.phrases)) continue;
      if (options.max_words > 0 && (detail::count_words(pair.source) > options.max_words ||
                                    detail::count_words(pair.target) > options.max_words))
        continue;
      if (seen.insert(pair).second) pairs.push_back(std::move(pair));
    }
  }
  return pairs;
}

// The same from the file at `path`.
inline std::vector<SentencePair> load_ding(const std::string& path, const DingOptions& options = {}) {
  std::error_code error;
  MOA_CHECK(!std::filesystem::is_directory(path, error), "load_ding", "'", path, "' is a directory, not a file");
  std::ifstream file(path);
  MOA_CHECK(file.good(), "load_ding", "cannot open '", path, "': ", std::strerror(errno),
            " (the German-English dictionary comes with Debian's trans-de-en package)");
  return read_ding(file, options);
}

}  // namespace moa_examples
