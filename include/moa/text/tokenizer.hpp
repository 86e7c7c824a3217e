// moa/text/tokenizer.hpp - SentencePiece subword tokenizer (optional: needs libsentencepiece, Debian's
// libsentencepiece-dev, found through pkg-config).
//
// Models are trained with moa's special ids (0 padding, 1 BOS, 2 EOS, 3 unknown; see
// seq2seq_data.hpp), so token ids go straight into the models.
#pragma once

#include "moa/error.hpp"
#include "moa/text/special_ids.hpp"
#include "moa/tensor.hpp"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <fstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace moa {

class SentencePieceTokenizer {
 public:
  // Trains a model on `sentences` and writes model_prefix.model and model_prefix.vocab. The text
  // goes through model_prefix.train.txt. model_type: "unigram" or "bpe". One thread: the same
  // sentences give the same pieces and scores (the model file also records the paths it used). extra_symbols (e.g. "<mask>") get the ids right after unknown.
  static void train(const std::vector<std::string>& sentences, const std::string& model_prefix, Index vocab_size,
                    const std::string& model_type = "unigram", const std::vector<std::string>& extra_symbols = {}) {
    const char* function = "SentencePieceTokenizer::train";
    MOA_CHECK(!sentences.empty(), function, "no sentences to train on");
    MOA_CHECK(vocab_size > kFirstRegularId, function, "vocab_size must exceed ", kFirstRegularId, ", got ", vocab_size);
    MOA_CHECK(model_type == "unigram" || model_type == "bpe", function, "model_type must be unigram or bpe, got '",
              model_type, "'");
    const std::string text_path = model_prefix + ".train.txt";
    {
      std::ofstream text(text_path);
      MOA_CHECK(text.good(), function, "cannot write '", text_path, "'");
      for (const std::string& sentence : sentences) text << sentence << '\n';
    }
    std::string symbols;
    for (const std::string& symbol : extra_symbols) symbols += (symbols.empty() ? "" : ",") + symbol;
    std::unordered_map<std::string, std::string> arguments{
        {"input", text_path},       {"model_prefix", model_prefix},
        {"vocab_size", std::to_string(vocab_size)},
        {"model_type", model_type}, {"character_coverage", "1.0"},
        {"pad_id", "0"},            {"bos_id", "1"},
        {"eos_id", "2"},            {"unk_id", "3"},
        {"num_threads", "1"},       {"hard_vocab_limit", "false"},
        {"minloglevel", "1"}};
    if (!symbols.empty()) arguments["user_defined_symbols"] = symbols;
    const auto status = sentencepiece::SentencePieceTrainer::Train(arguments);
    MOA_CHECK(status.ok(), function, "training failed: ", status.ToString());
  }

  explicit SentencePieceTokenizer(const std::string& model_path) {
    const auto status = processor_.Load(model_path);
    MOA_CHECK(status.ok(), "SentencePieceTokenizer", "cannot load '", model_path, "': ", status.ToString());
    MOA_CHECK(processor_.pad_id() == kPadId && processor_.bos_id() == kBosId && processor_.eos_id() == kEosId &&
                  processor_.unk_id() == kUnkId,
              "SentencePieceTokenizer", "'", model_path, "' does not use moa's special ids (pad 0, bos 1, eos 2, unk 3)");
  }

  Index vocab_size() const { return processor_.GetPieceSize(); }

  TokenIds encode(const std::string& text) const {
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    MOA_CHECK(status.ok(), "SentencePieceTokenizer::encode", status.ToString());
    return TokenIds(ids.begin(), ids.end());
  }

  std::string decode(const TokenIds& ids) const {
    std::vector<int> values;
    for (Index id : ids) {
      MOA_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer::decode", "id ", id, " is outside [0, ",
                vocab_size(), ")");
      values.push_back(static_cast<int>(id));
    }
    std::string text;
    const auto status = processor_.Decode(values, &text);
    MOA_CHECK(status.ok(), "SentencePieceTokenizer::decode", status.ToString());
    return text;
  }

  // The id of a piece (e.g. a symbol given to train), or throws if the model lacks it.
  Index id_of(const std::string& piece) const {
    const int id = processor_.PieceToId(piece);
    MOA_CHECK(id != processor_.unk_id() || piece == "<unk>", "SentencePieceTokenizer::id_of", "no piece '", piece, "'");
    return id;
  }

  std::string piece(Index id) const {
    MOA_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer::piece", "id ", id, " is outside [0, ",
              vocab_size(), ")");
    return processor_.IdToPiece(static_cast<int>(id));
  }

 private:
  sentencepiece::SentencePieceProcessor processor_;
};

}  // namespace moa
