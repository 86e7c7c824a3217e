#include "support.hpp"

#include "common/libreoffice_help.hpp"
#include "common/parallel_corpus.hpp"

#include <filesystem>
#include <fstream>

using namespace moa_test;

TEST_CASE("LibreOffice help: paragraphs and headings by id, markup flattened, the default platform variant kept",
          "[libreoffice]") {
  const std::string html =
      R"(<html><body><p id="par_1" dir="auto">Use <span id="sw" class="switchinline">)"
      R"(<span hidden="true" id="MAC1" class="MAC"><span class="keycode">Command</span></span>)"
      R"(<span hidden="true" id="default1"><span class="keycode">Ctrl</span></span></span>)"
      R"(<span class="keycode"> + F</span> to   open.</p><h1 id="hd_2">Find <b>Bar</b></h1><p>no id</p>)"
      R"(<script>var x = 1;</script><p id="par_3"></p></body></html>)";
  const auto blocks = moa_examples::help_blocks(html, "snippet");
  REQUIRE(blocks.size() == 3);
  REQUIRE(blocks.at("par_1") == "Use Ctrl + F to open.");
  REQUIRE(blocks.at("hd_2") == "Find Bar");
  REQUIRE(blocks.at("par_3").empty());
  REQUIRE(moa_examples::help_blocks("<<<not html", "broken").empty());
}

TEST_CASE("LibreOffice help: pages align by id; empty, identical, formula and symbol pairs are dropped",
          "[libreoffice]") {
  const std::string german =
      R"(<p id="a">Wählt alle Zellen aus.</p><p id="b">LibreOffice</p><p id="c">=SUMME(A1:A3)</p>)"
      R"(<p id="d">1, 2, 3; 4-5 %</p><p id="e">Nur deutsch.</p><p id="f"></p>)";
  const std::string english =
      R"(<p id="a">Selects all cells.</p><p id="b">LibreOffice</p><p id="c">=SUM(A1:A3)</p>)"
      R"(<p id="d">1, 2, 3; 4-5 %</p><p id="f">Empty in German.</p><p id="g">Only English.</p>)";
  const auto pairs = moa_examples::align_help_page(german, english, "page.html");
  REQUIRE(pairs.size() == 1);
  REQUIRE(pairs[0].source == "Wählt alle Zellen aus.");
  REQUIRE(pairs[0].target == "Selects all cells.");
  REQUIRE(moa_examples::detail::letter_share("Grüße") == Approx(1.0));
  REQUIRE(moa_examples::detail::letter_share("ab 12") == Approx(0.5));
  REQUIRE_MOA_ERROR(moa_examples::load_libreoffice_help(temporary_path("no_help")), "has no de/ and en-US/ folders");
}

namespace {

void write_file(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path) << text;
}

}  // namespace

TEST_CASE("Parallel corpus: the split is a fixed function of the German side, about 95/2/3", "[corpora]") {
  using moa_examples::Split;
  REQUIRE(moa_examples::split_of("Der Hund bellt.") == moa_examples::split_of("Der Hund bellt."));
  int counts[3] = {0, 0, 0};
  for (int i = 0; i < 20000; ++i) counts[static_cast<int>(moa_examples::split_of("w" + std::to_string(i)))]++;
  REQUIRE(counts[static_cast<int>(Split::valid)] == Approx(400).margin(80));
  REQUIRE(counts[static_cast<int>(Split::test)] == Approx(600).margin(100));
}

TEST_CASE("Parallel corpus: Ding and LibreOffice combined, origins kept, duplicates once, sources on one side",
          "[corpora]") {
  const std::string root = temporary_path("parallel_corpus");
  std::filesystem::remove_all(root);
  // Ding: two sentences and a phrase; LibreOffice: one page, repeating a Ding pair and a Ding source
  // with another translation, plus a long pair over --max-words.
  write_file(root + "/de-en", "Der Hund bellt. :: The dog barks.\nHund {m} :: dog\nEr liest. :: He reads.\n");
  std::string german = "<p id=\"a\">Der Hund bellt.</p><p id=\"b\">Er liest.</p><p id=\"c\">Neue Zeile.</p>";
  std::string english = "<p id=\"a\">The dog barks.</p><p id=\"b\">He is reading.</p><p id=\"c\">New line.</p>";
  german += "<p id=\"d\">Ein sehr langer Satz mit vielen Wörtern.</p>";
  english += "<p id=\"d\">A very long sentence with many words.</p>";
  write_file(root + "/help/de/text/page.html", german);
  write_file(root + "/help/en-US/text/page.html", english);

  moa_examples::ParallelCorpusOptions options;
  options.ding_path = root + "/de-en";
  options.help_root = root + "/help";
  options.ding_options.phrases = false;
  options.max_words = 5;
  const auto splits = moa_examples::load_parallel_corpus(options);
  std::map<std::string, std::pair<std::string, moa_examples::Corpus>> found;  // target -> (source, origin)
  for (int s = 0; s < 3; ++s)
    for (const auto& [pair, corpus] : splits[static_cast<std::size_t>(s)]) {
      found[pair.target] = {pair.source, corpus};
      REQUIRE(static_cast<int>(moa_examples::split_of(pair.source)) == s);
    }
  REQUIRE(found.size() == 4);  // not the phrase, not the long pair, "The dog barks." once
  REQUIRE(found.at("The dog barks.").second == moa_examples::Corpus::ding);
  REQUIRE(found.at("He reads.").second == moa_examples::Corpus::ding);
  REQUIRE(found.at("He is reading.").second == moa_examples::Corpus::libreoffice);
  REQUIRE(found.at("New line.").second == moa_examples::Corpus::libreoffice);

  moa_examples::choose_corpora(options, "libreoffice");
  REQUIRE((!options.ding && options.libreoffice));
  std::size_t help_pairs = 0;
  for (const auto& split : moa_examples::load_parallel_corpus(options)) help_pairs += split.size();
  REQUIRE(help_pairs == 3);
  REQUIRE_MOA_ERROR(moa_examples::choose_corpora(options, "ding,wiki"), "--corpora");
  REQUIRE(moa_examples::corpora_error("ding,libreoffice").empty());
  REQUIRE(moa_examples::corpora_error("ding,wiki") == "expected ding, libreoffice or ding,libreoffice, got 'ding,wiki'");
  // A help folder without pages is named as such.
  std::filesystem::create_directories(root + "/empty_help/de");
  std::filesystem::create_directories(root + "/empty_help/en-US");
  REQUIRE_MOA_ERROR(moa_examples::load_libreoffice_help(root + "/empty_help"), "holds no help pages");
  options.ding = options.libreoffice = false;
  REQUIRE_MOA_ERROR(moa_examples::load_parallel_corpus(options), "no corpus chosen");
}
