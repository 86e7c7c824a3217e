// examples/common/libreoffice_help.hpp - German-English sentence pairs from LibreOffice's help
// (Debian packages libreoffice-help-de and libreoffice-help-en-us), read with libxml2's HTML parser.
//
// Both languages hold the same pages under the same relative paths, and every paragraph and
// heading carries an id shared by both (<p id="par_id3147762">, <h1 id="hd_id...">): matched by
// (page, id) they give aligned pairs. Inline markup is flattened to its text; of a switchinline
// block's per-platform variants only the default one is kept (the others are hidden elements whose
// id does not start with "default"). Pairs are dropped when a side is empty, when both sides are
// the same (untranslated names, menu paths), when a side is a formula (starts with '='), and when
// under 60% of a side's characters are letters; duplicates are dropped.
#pragma once

#include "ding.hpp"  // SentencePair

#include "moa/error.hpp"

#include <libxml/HTMLparser.h>
#include <libxml/tree.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace moa_examples {

namespace detail {

inline std::string attribute(const xmlNode* node, const char* name) {
  xmlChar* value = xmlGetProp(node, reinterpret_cast<const xmlChar*>(name));
  if (value == nullptr) return {};
  std::string text(reinterpret_cast<const char*>(value));
  xmlFree(value);
  return text;
}

// A platform variant other than the default one (hidden="true" and an id not starting "default").
inline bool is_hidden_variant(const xmlNode* node) {
  if (attribute(node, "hidden") != "true") return false;
  return attribute(node, "id").rfind("default", 0) != 0;
}

inline void append_text(const xmlNode* node, std::string& text) {
  for (const xmlNode* child = node->children; child != nullptr; child = child->next) {
    if (child->type == XML_TEXT_NODE && child->content != nullptr) {
      text += reinterpret_cast<const char*>(child->content);
    } else if (child->type == XML_ELEMENT_NODE) {
      const char* name = reinterpret_cast<const char*>(child->name);
      if (std::strcmp(name, "script") == 0 || std::strcmp(name, "style") == 0 || is_hidden_variant(child)) continue;
      append_text(child, text);
    }
  }
}

// Whitespace runs become one space; none at either end.
inline std::string collapse_whitespace(const std::string& text) {
  std::istringstream words(text);
  std::string collapsed;
  for (std::string word; words >> word;) collapsed += (collapsed.empty() ? "" : " ") + word;
  return collapsed;
}

inline bool is_block_with_id(const xmlNode* node) {
  const char* name = reinterpret_cast<const char*>(node->name);
  const bool block = std::strcmp(name, "p") == 0 ||
                     (name[0] == 'h' && name[1] >= '1' && name[1] <= '6' && name[2] == '\0');
  return block && !attribute(node, "id").empty();
}

inline void collect_blocks(const xmlNode* node, std::map<std::string, std::string>& blocks) {
  for (const xmlNode* child = node; child != nullptr; child = child->next) {
    if (child->type != XML_ELEMENT_NODE) continue;
    if (is_hidden_variant(child)) continue;
    if (is_block_with_id(child)) {
      std::string text;
      append_text(child, text);
      blocks.emplace(attribute(child, "id"), collapse_whitespace(text));  // the first of a repeated id
      continue;
    }
    collect_blocks(child->children, blocks);
  }
}

// Share of a text's characters (UTF-8 code points, spaces excluded) that are letters: ASCII
// letters, or any code point beyond ASCII (umlauts, ß and the like).
inline double letter_share(const std::string& text) {
  double letters = 0, characters = 0;
  for (std::size_t i = 0; i < text.size();) {
    const unsigned char lead = static_cast<unsigned char>(text[i]);
    const std::size_t width = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
    if (lead != ' ') {
      characters += 1;
      if (lead >= 0x80 || (lead >= 'a' && lead <= 'z') || (lead >= 'A' && lead <= 'Z')) letters += 1;
    }
    i += width;
  }
  return characters > 0 ? letters / characters : 0.0;
}

}  // namespace detail

// The text of every paragraph and heading with an id in one HTML page, by id.
inline std::map<std::string, std::string> help_blocks(const std::string& html, const std::string& name) {
  const int options = HTML_PARSE_RECOVER | HTML_PARSE_NOERROR | HTML_PARSE_NOWARNING | HTML_PARSE_NONET;
  std::unique_ptr<xmlDoc, void (*)(xmlDocPtr)> document(
      htmlReadMemory(html.data(), static_cast<int>(html.size()), name.c_str(), "UTF-8", options), xmlFreeDoc);
  std::map<std::string, std::string> blocks;
  if (document == nullptr) return blocks;  // nothing a parser could recover
  detail::collect_blocks(xmlDocGetRootElement(document.get()), blocks);
  return blocks;
}

// Whether a (German, English) pair is kept (see the top of this file).
inline bool keep_help_pair(const SentencePair& pair) {
  if (pair.source.empty() || pair.target.empty() || pair.source == pair.target) return false;
  if (pair.source[0] == '=' || pair.target[0] == '=') return false;
  return detail::letter_share(pair.source) >= 0.6 && detail::letter_share(pair.target) >= 0.6;
}

// The aligned pairs of two versions of one page, in the German page's id order.
inline std::vector<SentencePair> align_help_page(const std::string& german_html, const std::string& english_html,
                                                 const std::string& name) {
  const auto german = help_blocks(german_html, name + " (de)");
  const auto english = help_blocks(english_html, name + " (en)");
  std::vector<SentencePair> pairs;
  for (const auto& [id, text] : german) {
    const auto found = english.find(id);
    if (found == english.end()) continue;
    SentencePair pair{text, found->second};
    if (keep_help_pair(pair)) pairs.push_back(std::move(pair));
  }
  return pairs;
}

// Every distinct pair of the help under `root` (holding de/ and en-US/), pages in path order.
inline std::vector<SentencePair> load_libreoffice_help(const std::string& root = "/usr/share/libreoffice/help") {
  namespace fs = std::filesystem;
  const fs::path german_root = fs::path(root) / "de", english_root = fs::path(root) / "en-US";
  std::error_code error;
  MOA_CHECK(fs::is_directory(german_root, error) && fs::is_directory(english_root, error), "load_libreoffice_help",
            "'", root, "' has no de/ and en-US/ folders (Debian packages libreoffice-help-de and libreoffice-help-en-us)");
  std::vector<fs::path> pages;
  for (const auto& entry : fs::recursive_directory_iterator(german_root))
    if (entry.is_regular_file() && entry.path().extension() == ".html")
      pages.push_back(fs::relative(entry.path(), german_root));
  MOA_CHECK(!pages.empty(), "load_libreoffice_help", "'", german_root.string(), "' holds no help pages (*.html)");
  std::sort(pages.begin(), pages.end());
  auto read = [](const fs::path& path) {
    std::ifstream file(path, std::ios::binary);
    std::ostringstream bytes;
    bytes << file.rdbuf();
    return bytes.str();
  };
  std::vector<SentencePair> pairs;
  std::set<SentencePair> seen;
  for (const fs::path& page : pages) {
    if (!fs::exists(english_root / page, error)) continue;
    for (SentencePair& pair : align_help_page(read(german_root / page), read(english_root / page), page.string()))
      if (seen.insert(pair).second) pairs.push_back(std::move(pair));
  }
  return pairs;
}

}  // namespace moa_examples
