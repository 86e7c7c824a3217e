#include "support.hpp"

#include "common/libreoffice_help.hpp"

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
