#include "support.hpp"

#include "moa/text/tokenizer.hpp"

using namespace moa_test;

TEST_CASE("SentencePieceTokenizer: trains with moa's special ids and round-trips text", "[tokenizer]") {
  std::vector<std::string> sentences;
  const char* words[] = {"the", "dog", "barks", "a", "cat", "sleeps", "under", "green", "trees", "today"};
  moa::Rng rng(1);
  for (int i = 0; i < 300; ++i) {
    std::string sentence;
    for (int w = 0; w < 6; ++w) sentence += std::string(w ? " " : "") + words[rng.below(10)];
    sentences.push_back(sentence);
  }
  const std::string prefix = temporary_path("spm");
  moa::SentencePieceTokenizer::train(sentences, prefix, 40, "bpe", {"<mask>"});
  const moa::SentencePieceTokenizer tokenizer(prefix + ".model");
  REQUIRE(tokenizer.id_of("<mask>") == moa::kFirstRegularId);
  REQUIRE_MOA_ERROR(tokenizer.id_of("<nothing>"), "no piece '<nothing>'");
  REQUIRE(tokenizer.vocab_size() <= 40);
  REQUIRE(tokenizer.piece(moa::kUnkId) == "<unk>");
  const moa::TokenIds ids = tokenizer.encode("the green dog sleeps");
  REQUIRE(!ids.empty());
  for (moa::Index id : ids) REQUIRE(id > moa::kFirstRegularId);  // not a special id nor <mask>
  REQUIRE(tokenizer.decode(ids) == "the green dog sleeps");
  REQUIRE_MOA_ERROR(tokenizer.decode({100000}), "id 100000 is outside");
  REQUIRE_MOA_ERROR(moa::SentencePieceTokenizer(temporary_path("nope.model")), "cannot load");
  REQUIRE_MOA_ERROR(moa::SentencePieceTokenizer::train({}, prefix, 40), "no sentences");
  REQUIRE_MOA_ERROR(moa::SentencePieceTokenizer::train(sentences, prefix, 40, "word2vec"), "unigram or bpe");
}
