#include "support.hpp"

#include "common/ding.hpp"
#include "moa/text/metrics.hpp"

#include <cmath>
#include <fstream>

using namespace moa_test;

TEST_CASE("Ding: alternatives align, the first synonym is taken, annotations dropped", "[ding]") {
  const auto pairs = moa_examples::parse_ding_line(
      "Aalleiter {f}; Aaltreppe {f} (Wasserbau) | Aalleitern {pl}; Aaltreppen {pl} :: eel ladder (water engineering) | "
      "eel ladders");
  REQUIRE(pairs.size() == 2);
  REQUIRE(pairs[0].source == "Aalleiter");
  REQUIRE(pairs[0].target == "eel ladder");
  REQUIRE(pairs[1].source == "Aalleitern");
  REQUIRE(pairs[1].target == "eel ladders");
  const auto annotated = moa_examples::parse_ding_line("Haben Sie etwas gegen Sonnenbrand? [med.] /Abk./ :: Have you anything "
                                              "for sunburn? <sunburn> {adj}");
  REQUIRE(annotated.size() == 1);
  REQUIRE(annotated[0].source == "Haben Sie etwas gegen Sonnenbrand?");
  REQUIRE(annotated[0].target == "Have you anything for sunburn?");
  REQUIRE(moa_examples::is_sentence(annotated[0]));
  REQUIRE_FALSE(moa_examples::is_sentence(pairs[0]));
  REQUIRE(moa_examples::parse_ding_line("und/oder :: and/or")[0].source == "und/oder");  // a lone slash is text
  // Sides that do not align, comments and lines without a separator are skipped.
  REQUIRE(moa_examples::parse_ding_line("eins | zwei :: one").empty());
  REQUIRE(moa_examples::parse_ding_line("# Version :: devel").empty());
  REQUIRE(moa_examples::parse_ding_line("no separator here").empty());
  REQUIRE(moa_examples::parse_ding_line("{f} :: only annotation").empty());
}

TEST_CASE("Ding: loading filters phrases, sentences and length and drops duplicates", "[ding]") {
  const std::string path = temporary_path("ding.txt");
  {
    std::ofstream file(path);
    file << "# comment\n"
         << "Hund {m} | Hunde {pl} :: dog | dogs\n"
         << "Hund {m} :: dog\n"
         << "Der Hund bellt. :: The dog barks.\n"
         << "ein sehr langer deutscher Ausdruck hier :: a very long English expression here\n";
  }
  REQUIRE(moa_examples::load_ding(path).size() == 4);
  moa_examples::DingOptions sentences_only;
  sentences_only.phrases = false;
  REQUIRE(moa_examples::load_ding(path, sentences_only).size() == 1);
  moa_examples::DingOptions short_ones;
  short_ones.max_words = 3;
  REQUIRE(moa_examples::load_ding(path, short_ones).size() == 3);
  REQUIRE_MOA_ERROR(moa_examples::load_ding(temporary_path("missing.txt")), "trans-de-en");
}

TEST_CASE("BLEU: hand-computed case, identity and brevity penalty", "[metrics]") {
  // precisions 5/6, 3/5, 2/4, 1/3; equal lengths: BLEU = (1/12)^(1/4)
  REQUIRE(moa::corpus_bleu({"the cat sat on the mat"}, {"the cat sat on a mat"}) ==
          Approx(100 * std::pow(1.0 / 12, 0.25)));
  REQUIRE(moa::corpus_bleu({"a b c d e", "x y z w"}, {"a b c d e", "x y z w"}) == Approx(100.0));
  // hypothesis 4 words of a 5-word reference: all precisions 1, BP = exp(1 - 5/4)
  REQUIRE(moa::corpus_bleu({"a b c d"}, {"a b c d e"}) == Approx(100 * std::exp(1 - 5.0 / 4)));
  REQUIRE(moa::corpus_bleu({"x y z"}, {"a b c"}) == 0.0);
  REQUIRE_MOA_ERROR(moa::corpus_bleu({"a"}, {}), "got 1 hypotheses and 0 references");
}

TEST_CASE("chrF: hand-computed case and identity", "[metrics]") {
  // n=1: P = R = 1/2; n=2: P = R = 0; n>2: none. Averages 1/4: F2 = 5 (1/16) / (4/4 + 1/4) = 1/4.
  REQUIRE(moa::corpus_chrf({"ab"}, {"ac"}) == Approx(25.0));
  REQUIRE(moa::corpus_chrf({"Grüße aus Köln"}, {"Grüße aus Köln"}) == Approx(100.0));
  REQUIRE(moa::corpus_chrf({"a b"}, {"ab"}) == Approx(100.0));  // spaces do not count
  REQUIRE(moa::corpus_chrf({"xyz"}, {"abc"}) == 0.0);
}

namespace {

// A test set of `count` sentences where a system gets `right` sentences exactly right and the
// rest wrong in every word.
struct TestSet {
  std::vector<std::string> references, good, mixed, bad;
  explicit TestSet(int count) {
    for (int i = 0; i < count; ++i) {
      const std::string w = std::to_string(i);
      references.push_back("w" + w + " the quick brown fox jumps over dog " + w);
      good.push_back(references.back());
      mixed.push_back(i % 2 == 0 ? references.back() : "z" + w + " a slow red cat sits under log " + w);
      bad.push_back("q" + w + " nothing here matches at all in " + w + " x");
    }
  }
};

}  // namespace

TEST_CASE("BLEU statistics add up to corpus BLEU", "[metrics]") {
  const TestSet set(20);
  moa::BleuStatistics total;
  for (const auto& sentence : moa::bleu_statistics(set.mixed, set.references)) total += sentence;
  REQUIRE(total.score() == Approx(moa::corpus_bleu(set.mixed, set.references)));
  REQUIRE(total.hypothesis_length == 20 * 9);
}

TEST_CASE("bootstrap_bleu: a 95% interval around the score, reproducible by seed", "[metrics]") {
  const TestSet set(200);
  moa::Rng rng(3), same(3);
  const moa::BootstrapEstimate estimate = moa::bootstrap_bleu(set.mixed, set.references, rng);
  REQUIRE(estimate.score == Approx(moa::corpus_bleu(set.mixed, set.references)));
  REQUIRE(estimate.lower < estimate.score);
  REQUIRE(estimate.score < estimate.upper);
  REQUIRE(estimate.mean == Approx(estimate.score).epsilon(0.05));
  // Half the sentences right: the corpus BLEU moves with the share of right sentences, whose
  // standard error over 200 is 3.5%: the interval spans several BLEU, not 0 and not 50.
  REQUIRE(estimate.upper - estimate.lower > 2.0);
  REQUIRE(estimate.upper - estimate.lower < 30.0);
  const moa::BootstrapEstimate again = moa::bootstrap_bleu(set.mixed, set.references, same);
  REQUIRE(again.lower == estimate.lower);
  REQUIRE(again.upper == estimate.upper);
  // A perfect system has no spread.
  moa::Rng other(4);
  const moa::BootstrapEstimate perfect = moa::bootstrap_bleu(set.good, set.references, other);
  REQUIRE(perfect.lower == Approx(100.0));
  REQUIRE(perfect.upper == Approx(100.0));
  REQUIRE_MOA_ERROR(moa::bootstrap_bleu({}, {}, other), "needs at least one sentence");
  REQUIRE_MOA_ERROR(moa::bootstrap_bleu(set.good, set.references, other, 10), "samples must be at least 40");
}

TEST_CASE("paired_bootstrap_bleu: a clear difference has a small p, a system against itself p = 1", "[metrics]") {
  const TestSet set(200);
  moa::Rng rng(5);
  const moa::PairedBootstrap clear = moa::paired_bootstrap_bleu(set.good, set.mixed, set.references, rng);
  REQUIRE(clear.system.score == Approx(100.0));
  REQUIRE(clear.baseline.score == Approx(moa::corpus_bleu(set.mixed, set.references)));
  REQUIRE(clear.p_value < 0.01);
  REQUIRE(clear.p_value >= 1.0 / 1001.0);  // the +1: never exactly 0
  const moa::PairedBootstrap same = moa::paired_bootstrap_bleu(set.mixed, set.mixed, set.references, rng);
  REQUIRE(same.p_value == 1.0);  // no difference to explain
  // Two systems a few sentences apart: no evidence either way.
  std::vector<std::string> nearly = set.mixed;
  nearly[1] = set.references[1];
  const moa::PairedBootstrap close = moa::paired_bootstrap_bleu(nearly, set.mixed, set.references, rng);
  REQUIRE(close.system.score > close.baseline.score);
  REQUIRE(close.p_value > 0.05);
  REQUIRE(same.system.lower == same.baseline.lower);
  REQUIRE_MOA_ERROR(moa::paired_bootstrap_bleu(set.good, {"a"}, set.references, rng), "1 baseline hypotheses");
}
