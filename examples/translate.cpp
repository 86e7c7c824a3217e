// German-to-English translation on real sentences from Debian: the Ding dictionary (trans-de-en)
// and LibreOffice's help (libreoffice-help-de, -en-us). Trains a Transformer whose attention is MoA
// or multi-head attention, evaluates BLEU (with a bootstrap interval, overall and per corpus) and
// chrF with beam search and the KV cache, and reports which tokens each expert prefers. With
// --baseline it trains a second model (usually MHA at the same multiply-adds) and compares the two.
//
//     translate --attention moa:4K8E48D --baseline mha:4H32D --steps 600 --output runs/demo
//     translate --synthetic --steps 200          (no corpus needed: learn to reverse token strings)
#include "moa/io/attention_spans.hpp"
#include "moa/io/checkpoint.hpp"
#include "moa/models/decoding.hpp"
#include "common/parallel_corpus.hpp"
#include "moa/text/metrics.hpp"
#include "moa/moa.hpp"
#include "common/plot.hpp"
#include "moa/text/batching.hpp"
#include "moa/text/tokenizer.hpp"
#include "common/training.hpp"
#include "common/training_loop.hpp"
#include "moa/models.hpp"

#include "common/compute_options.hpp"
#include "common/distributed.hpp"
#include "common/flags.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Index = moa::Index;

struct Options {
  std::string attention = "moa:4K8E48D";
  std::string baseline;
  std::string spans;  // JSON of per-layer, per-expert spans for MoA decoder self-attention
  std::string output = "runs/translate";
  std::string corpora = "ding,libreoffice";
  std::string corpus = "/usr/share/trans/de-en";
  std::string help_root = "/usr/share/libreoffice/help";
  std::string data = "sentences";
  std::size_t max_words = 20;
  bool synthetic = false;
  std::uint64_t seed = 1;
  long long steps = 1000;
  Index batch_tokens = 1536;
  double learning_rate = 3e-3;  // peak; the best of 1e-3, 2e-3, 3e-3 at 600 steps of the demo's model
  long long warmup = 400;
  double label_smoothing = 0.1;
  double dropout = 0.1;
  double clip_norm = 1.0;
  moa_examples::ComputeOptions compute;
  Index model_dim = 128;
  Index ffn_dim = 256;
  Index layers = 2;
  bool pre_norm = false;
  Index vocab_size = 2000;
  std::string tokenizer_type = "unigram";
  Index max_tokens = 48;
  bool resume = false;
  bool reuse_tokenizer = false;
  long long valid_every = 100;
  long long checkpoint_every = 100;
  int average_checkpoints = 1;  // evaluate the mean of the last N checkpoints' parameters
  Index eval_sentences = 0;  // all
  Index beam = 4;
  double length_penalty = 0.6;
  int jobs = 2;
  std::string on_divergence = "stop";
  moa_examples::Distributed world;  // the ranks under mpirun (data parallel); one process otherwise
};

// Tokenised splits, plus the test split's text for BLEU.
struct Data {
  std::vector<moa::TokenPair> train, valid, test;
  std::vector<std::string> test_sources, test_references;
  std::vector<moa_examples::Corpus> test_corpora;
  std::unique_ptr<moa::SentencePieceTokenizer> tokenizer;  // none for the synthetic task
  Index vocab_size = 0;

  std::string detokenize(const moa::TokenIds& ids) const {
    if (tokenizer) return tokenizer->decode(ids);
    std::string text;
    for (Index id : ids) text += (text.empty() ? "" : " ") + std::to_string(id);
    return text;
  }
  std::string piece(Index id) const { return tokenizer ? tokenizer->piece(id) : std::to_string(id); }
};

Data load_data(const Options& options) {
  Data data;
  if (options.synthetic) {
    moa::Rng rng(options.seed + 7);
    data.vocab_size = 24;
    data.train = moa::synthetic_reverse_task(4000, data.vocab_size, 3, 10, rng);
    data.valid = moa::synthetic_reverse_task(100, data.vocab_size, 3, 10, rng);
    data.test = moa::synthetic_reverse_task(100, data.vocab_size, 3, 10, rng);
    for (const auto& pair : data.test) {
      data.test_sources.push_back(data.detokenize(pair.source));
      data.test_references.push_back(data.detokenize(pair.target));
    }
    return data;
  }
  moa_examples::ParallelCorpusOptions corpus;
  moa_examples::choose_corpora(corpus, options.corpora);
  corpus.ding_path = options.corpus;
  corpus.help_root = options.help_root;
  corpus.ding_options.phrases = options.data != "sentences";
  corpus.ding_options.sentences = options.data != "phrases";
  corpus.max_words = options.max_words;
  const auto splits = moa_examples::load_parallel_corpus(corpus);
  const char* names[3] = {"train", "valid", "test"};
  for (int s = 0; s < 3; ++s)
    MOA_CHECK(!splits[s].empty(), "translate", "the ", names[s], " split of --corpora ", options.corpora,
              " is empty (try --data both or a larger --max-words)");

  // One vocabulary for both languages (the embeddings are shared), trained on the train split
  // only, kept in the output folder and reused by later runs and resumes.
  const std::string model_prefix = options.output + "/spm";
  const std::string tokenizer_flags = "--tokenizer " + options.tokenizer_type + " --vocab-size " +
                                      std::to_string(options.vocab_size) + " --corpora " + options.corpora +
                                      " --data " + options.data +
                                      " --max-words " + std::to_string(options.max_words);
  // Rank 0 trains it (or checks the one there) and the other ranks receive it.
  const bool train_tokenizer = options.world.is_root() && moa_examples::tokenizer_needs_training(
      "translate", model_prefix, tokenizer_flags, options.reuse_tokenizer, options.vocab_size,
      [](const std::string& path) { return moa::SentencePieceTokenizer(path).vocab_size(); });
  if (train_tokenizer) {
    std::vector<std::string> text;
    for (const auto& example : splits[0]) {
      text.push_back(example.pair.source);
      text.push_back(example.pair.target);
    }
    std::fprintf(stderr, "training a %s SentencePiece model (vocabulary %lld) on %zu lines\n",
                 options.tokenizer_type.c_str(), static_cast<long long>(options.vocab_size), text.size());
    moa::SentencePieceTokenizer::train(text, model_prefix, options.vocab_size, options.tokenizer_type);
  }
  moa_examples::share_file(options.world, model_prefix + ".model");
  data.tokenizer = std::make_unique<moa::SentencePieceTokenizer>(model_prefix + ".model");
  data.vocab_size = data.tokenizer->vocab_size();
  if (train_tokenizer)
    moa_examples::record_tokenizer("translate", model_prefix, tokenizer_flags, options.vocab_size, data.vocab_size);
  auto tokenize = [&](const std::vector<moa_examples::CorpusPair>& examples, std::vector<moa::TokenPair>& out, bool keep_text) {
    for (const auto& [pair, origin] : examples) {
      moa::TokenPair tokens{data.tokenizer->encode(pair.source), data.tokenizer->encode(pair.target)};
      if (tokens.source.empty() || tokens.target.empty()) continue;
      if (static_cast<Index>(std::max(tokens.source.size(), tokens.target.size())) >= options.max_tokens) continue;
      out.push_back(std::move(tokens));
      if (keep_text) {
        data.test_sources.push_back(pair.source);
        data.test_references.push_back(pair.target);
        data.test_corpora.push_back(origin);
      }
    }
  };
  tokenize(splits[0], data.train, false);
  tokenize(splits[1], data.valid, false);
  tokenize(splits[2], data.test, true);
  const std::vector<moa::TokenPair>* tokenized[3] = {&data.train, &data.valid, &data.test};
  for (int s = 0; s < 3; ++s)
    MOA_CHECK(!tokenized[s]->empty(), "translate", "no ", names[s], " pair is shorter than --max-tokens ",
              options.max_tokens, " tokens");
  return data;
}

moa::TransformerConfig model_config(const Options& options, const std::string& spec, Index vocab_size) {
  moa::TransformerConfig config;
  config.vocab_size = vocab_size;
  config.model_dim = options.model_dim;
  config.ffn_dim = options.ffn_dim;
  config.encoder_layers = options.layers;
  config.decoder_layers = options.layers;
  config.dropout = options.dropout;
  config.norm = options.pre_norm ? moa::NormPlacement::pre : moa::NormPlacement::post;
  config.attention = moa::AttentionSpec::parse(spec);
  if (!options.spans.empty() && config.attention.kind == moa::AttentionSpec::Kind::moa)
    config.decoder_spans = moa::load_attention_spans(options.spans);
  return config;
}

std::string describe(const moa::TransformerConfig& config) {
  std::string spans;
  for (std::size_t layer = 0; layer < config.decoder_spans.size(); ++layer) {
    spans += " decoder.layers." + std::to_string(layer) + " spans";
    for (const moa::AttentionSpan& span : config.decoder_spans[layer]) spans += " [" + span.to_string() + "]";
  }
  return config.attention.to_string() + " d" + std::to_string(config.model_dim) + " ffn" + std::to_string(config.ffn_dim) +
         " layers" + std::to_string(config.encoder_layers) + "+" + std::to_string(config.decoder_layers) + " vocab" +
         std::to_string(config.vocab_size) + (config.norm == moa::NormPlacement::pre ? " pre-LN" : " post-LN") + spans;
}

// Multiply-adds per target token: encoder layers (per source token; equal lengths assumed),
// decoder layers and the output projection.
double macs_per_token(const moa::TransformerConfig& config, Index length) {
  const double ffn = 2.0 * moa::cost::linear(1, config.model_dim, config.ffn_dim);
  const double attention = config.attention.flops_per_token(config.model_dim, length);
  const double flops = config.encoder_layers * (attention + ffn) + config.decoder_layers * (2 * attention + ffn) +
                       moa::cost::linear(1, config.model_dim, config.vocab_size);
  return flops / 2.0;
}

// Refuses a model too large for this machine before anything is allocated.
void check_memory(const Options& options, const std::string& spec, Index vocab_size) {
  const moa::AttentionSpec attention = moa::AttentionSpec::parse(spec);
  const double d = static_cast<double>(options.model_dim), ffn = static_cast<double>(options.ffn_dim);
  const double layers = static_cast<double>(options.layers), vocab = static_cast<double>(vocab_size);
  const double attention_parameters = moa_examples::attention_parameters(attention, d);
  const double parameters = vocab * d + layers * (3.0 * attention_parameters + 4.0 * d * ffn);
  const double keys = static_cast<double>(options.max_tokens);
  const double activations =
      layers * (3.0 * moa_examples::attention_activations(attention, d, keys) + 2.0 * ffn) + 2.0 * vocab;
  moa_examples::check_memory("translate", parameters, static_cast<double>(options.batch_tokens), activations);
}

// Bootstrap resampling of the test set draws from its own generator, the same in every run, so
// two runs' intervals and p-values are comparable.
constexpr std::uint64_t kBootstrapSeed = 12345;

// The charts' train curve is a moving average of the NLL, without label smoothing and aux losses, so
// it is comparable with the validation NLL; it still has dropout on, which validation has off.
constexpr const char* kTrainCurve = "train NLL (dropout on)";

struct RunResult {
  std::string name, spec;
  Index parameters = 0;
  double macs = 0, tokens_per_second = 0, valid_loss = 0, bleu_beam = 0, bleu_greedy = 0, chrf = 0;
  moa::BootstrapEstimate bleu_interval;          // beam BLEU with its 95% bootstrap interval
  struct CorpusBleu {
    std::string corpus;
    std::size_t sentences;
    double bleu;  // beam
  };
  std::vector<CorpusBleu> bleu_by_corpus;
  struct Information {
    std::string site;
    double tokens, shuffled;  // MI(token; expert) in nats, and with the tokens shuffled
  };
  std::vector<Information> mutual_information;  // MoA: per routed site, on the validation split
  std::vector<std::string> hypotheses, references;  // beam outputs on the test sentences
  std::vector<double> steps, train_nlls, valid_steps, valid_losses;  // train NLL: a moving average
  std::string folder;
};

template <typename Attention>
class Run {
 public:
  using Model = moa::Seq2Seq<Attention>;

  Run(const Options& options, const Data& data, const std::string& spec, const std::string& folder, bool concurrent)
      : concurrent_(concurrent), options_(options), data_(data), folder_(folder), config_(model_config(options, spec, data.vocab_size)),
        init_rng_(options.seed), model_(config_, init_rng_), parameters_(moa::parameters_of(model_)),
        adam_(parameters_, {0.9, 0.98, 1e-9, 0.0, false}), schedule_(options.learning_rate, options.warmup),
        dropout_rng_(options.seed + 1) {
    compute_ = options.compute.make("translate");
    model_.set_compute(compute_);
    adam_.set_compute(compute_);
    fs::create_directories(folder_);
    result_.name = config_.attention.kind_name();
    result_.spec = spec;
    result_.parameters = parameters_.numel();
    result_.folder = folder_;
    Index average = 0;
    for (const auto& pair : data_.train) average += static_cast<Index>(pair.target.size()) + 1;
    result_.macs = macs_per_token(config_, data_.train.empty() ? 1 : average / static_cast<Index>(data_.train.size()));
  }

  // Everything that can fail before training: the training loop's settings and the resume.
  void prepare() {
    moa_examples::TrainingSettings settings;
    settings.name = result_.name;
    settings.plain_progress = concurrent_;
    settings.folder = folder_;
    settings.config = describe(config_);
    settings.steps = options_.steps;
    settings.valid_every = options_.valid_every;
    settings.checkpoint_every = options_.checkpoint_every;
    settings.seed = options_.seed;
    settings.batch_tokens = options_.batch_tokens;
    settings.clip_norm = options_.clip_norm;
    settings.resume = options_.resume;
    settings.on_divergence =
        options_.on_divergence == "skip" ? moa_examples::OnDivergence::skip : moa_examples::OnDivergence::stop;
    settings.keep_snapshots = options_.average_checkpoints > 1 ? options_.average_checkpoints : 0;
    settings.distributed = options_.world;
    loop_.emplace(settings, parameters_, adam_, schedule_, dropout_rng_);
    first_step_ = loop_->restore();
    if (first_step_ > 0 && options_.world.is_root())
      std::fprintf(stderr, "[%s] resumed from %s at step %lld\n", result_.name.c_str(), loop_->checkpoint_path().c_str(),
                   first_step_);
  }

  const std::string& name() const { return result_.name; }

  RunResult train_and_evaluate() {
    moa_examples::TrainingLoop<float>& loop = *loop_;
    const long long first_step = first_step_;
    if (options_.world.is_root())
      std::fprintf(stderr, "[%s] %s: %lld parameters, %zu train / %zu valid / %zu test pairs%s\n", result_.name.c_str(),
                   describe(config_).c_str(), static_cast<long long>(result_.parameters), data_.train.size(),
                   data_.valid.size(), data_.test.size(), data_parallel_note(options_.world).c_str());
    moa::CrossEntropyLoss<float> loss_function(options_.label_smoothing, moa::kPadId);
    loss_function.set_compute(compute_);
    auto train_step = [&](const std::vector<std::size_t>& indices, moa::Rng& rng, const moa_examples::Combine& combine) {
      const moa::Seq2SeqBatch batch = moa::make_seq2seq_batch(data_.train, indices);
      model_.set_training(true);
      const moa::Matrix<float> logits =
          model_.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, rng);
      moa_examples::StepReport report;
      report.loss = loss_function.forward(logits, batch.target_output);
      report.tokens = static_cast<double>(batch.target_tokens);
      report.values = {{"train_nll", loss_function.nll()}, {"aux_loss", model_.aux_loss()}};
      const double factor = combine(report, static_cast<double>(loss_function.counted()));
      model_.backward(loss_function.backward(static_cast<float>(factor)));
      return report;
    };
    auto validate = [&]() -> std::vector<std::pair<std::string, double>> {
      result_.valid_loss = validation_loss(true);
      return {{"valid_loss", result_.valid_loss}};
    };
    loop.run(first_step, data_.train, train_step, validate);
    result_.tokens_per_second = loop.tokens_per_second();
    if (!options_.world.is_root()) return result_;  // rank 0 evaluates and writes the results
    const moa_examples::TrainingCurves curves = loop.curves();
    result_.steps = curves.steps;
    result_.train_nlls = moa_examples::moving_average(curves.train_nlls, std::max<std::size_t>(1, curves.steps.size() / 40));
    result_.valid_steps = curves.valid_steps;
    result_.valid_losses = curves.valid_losses;
    if (!curves.valid_losses.empty()) result_.valid_loss = curves.valid_losses.back();
    if (options_.average_checkpoints > 1) average_checkpoints();
    evaluate();
    if constexpr (!std::is_same_v<Attention, moa::MultiHeadAttention<float>>) analyse_experts();
    moa_examples::write_line_chart(folder_ + "/loss.svg", result_.name + " " + result_.spec + ": loss", "step", "loss (nats/token)",
                          {{kTrainCurve, result_.steps, result_.train_nlls, "#1f77b4", true},
                           {"valid", result_.valid_steps, result_.valid_losses, "#1f77b4", false}});
    return result_;
  }

 private:
  // The NLL per target token over the valid split. `shared`: every rank is here (validation during
  // training) and takes its share of the batches (batch i on rank i mod N); the sums are combined.
  double validation_loss(bool shared) {
    model_.set_training(false);
    moa::CrossEntropyLoss<float> loss_function(0.0, moa::kPadId);
    loss_function.set_compute(compute_);
    moa::Rng order(0);
    const moa_examples::Distributed& world = options_.world;
    double sums[2] = {0, 0};  // NLL, targets
    double& total = sums[0];
    double& count = sums[1];
    const auto batches = moa::make_token_batches(data_.valid, options_.batch_tokens, order);
    for (std::size_t b = 0; b < batches.size(); ++b) {
      if (shared && b % static_cast<std::size_t>(world.size()) != static_cast<std::size_t>(world.rank())) continue;
      const auto batch = moa::make_seq2seq_batch(data_.valid, batches[b]);
      loss_function.forward(model_.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch,
                                           dropout_rng_),
                            batch.target_output);
      total += loss_function.nll() * static_cast<double>(loss_function.counted());
      count += static_cast<double>(loss_function.counted());
    }
    if (shared) world.sum(sums, 2);
    return count > 0 ? total / count : 0.0;
  }

  // The model becomes the mean of the last --average-checkpoints checkpoints' parameters (fewer if
  // the run has fewer), as the Transformer recipe evaluates; checkpoint.safetensors is unchanged.
  void average_checkpoints() {
    const auto snapshots = loop_->snapshots();
    std::vector<std::string> paths;
    for (const auto& snapshot : snapshots) paths.push_back(snapshot.second);
    if (paths.size() < 2) return;
    moa::average_parameters(paths, parameters_);
    const double last = result_.valid_loss;
    result_.valid_loss = validation_loss(false);  // rank 0 alone
    std::fprintf(stderr, "[%s] evaluating the mean of the last %zu checkpoints (steps %lld to %lld): valid loss %.3f (last checkpoint %.3f)\n",
                 result_.name.c_str(), paths.size(), snapshots.front().first, snapshots.back().first, result_.valid_loss,
                 last);
  }

  // BLEU and chrF on (a prefix of) the test split, beam search and greedy, both with the cache.
  void evaluate() {
    model_.set_training(false);
    const std::size_t count = options_.eval_sentences == 0
                                  ? data_.test.size()
                                  : std::min<std::size_t>(data_.test.size(), static_cast<std::size_t>(options_.eval_sentences));
    std::vector<std::string> beam_outputs(count), greedy_outputs(count);
    moa::BeamSearchOptions beam;
    beam.beam_size = options_.beam;
    beam.length_penalty = options_.length_penalty;
    beam.max_length = options_.max_tokens + 8;
    for (std::size_t first = 0; first < count; first += 16) {
      std::vector<std::size_t> indices;
      for (std::size_t i = first; i < std::min(count, first + 16); ++i) indices.push_back(i);
      const auto batch = moa::make_seq2seq_batch(data_.test, indices);
      const auto beams = moa::beam_search(model_, batch.source, batch.source_batch, beam);
      const auto greedy = moa::greedy_decode(model_, batch.source, batch.source_batch, beam.max_length);
      for (std::size_t i = 0; i < indices.size(); ++i) {
        beam_outputs[indices[i]] = data_.detokenize(beams[i]);
        greedy_outputs[indices[i]] = data_.detokenize(greedy[i]);
      }
    }
    const std::vector<std::string> references(data_.test_references.begin(),
                                              data_.test_references.begin() + static_cast<std::ptrdiff_t>(count));
    result_.bleu_beam = moa::corpus_bleu(beam_outputs, references);
    moa::Rng resampling(kBootstrapSeed);
    result_.bleu_interval = moa::bootstrap_bleu(beam_outputs, references, resampling);
    result_.hypotheses = beam_outputs;
    result_.references = references;
    result_.bleu_greedy = moa::corpus_bleu(greedy_outputs, references);
    result_.chrf = moa::corpus_chrf(beam_outputs, references);
    result_.bleu_by_corpus.clear();
    if (!data_.test_corpora.empty()) {
      for (const moa_examples::Corpus corpus : {moa_examples::Corpus::ding, moa_examples::Corpus::libreoffice}) {
        std::vector<std::string> corpus_outputs, corpus_references;
        for (std::size_t i = 0; i < count; ++i)
          if (data_.test_corpora[i] == corpus) {
            corpus_outputs.push_back(beam_outputs[i]);
            corpus_references.push_back(references[i]);
          }
        if (!corpus_outputs.empty())
          result_.bleu_by_corpus.push_back({moa_examples::corpus_name(corpus), corpus_outputs.size(),
                                            moa::corpus_bleu(corpus_outputs, corpus_references)});
      }
    }
    std::ofstream hypotheses(folder_ + "/test.hyp"), refs(folder_ + "/test.ref"), sources(folder_ + "/test.src");
    for (std::size_t i = 0; i < count; ++i) {
      hypotheses << beam_outputs[i] << '\n';
      refs << references[i] << '\n';
      sources << data_.test_sources[i] << '\n';
    }
    std::fprintf(stderr, "[%s] test (%zu sentences): BLEU %.2f [%.2f, %.2f] (beam %lld; 95%% bootstrap interval), %.2f (greedy), chrF %.2f\n",
                 result_.name.c_str(), count, result_.bleu_beam, result_.bleu_interval.lower,
                 result_.bleu_interval.upper, static_cast<long long>(options_.beam), result_.bleu_greedy, result_.chrf);
    for (const auto& entry : result_.bleu_by_corpus)
      std::fprintf(stderr, "[%s] test BLEU on the %zu %s sentences: %.2f\n", result_.name.c_str(), entry.sentences,
                   entry.corpus.c_str(), entry.bleu);
    for (std::size_t i : sample_sentences(count))
      std::fprintf(stderr, "  %s\n  -> %s\n  (reference: %s)\n", data_.test_sources[i].c_str(), beam_outputs[i].c_str(),
                   references[i].c_str());
  }

  // A few test sentences to show: per corpus the first two whose reference has 4 to 12 words (the
  // first three of the synthetic task).
  std::vector<std::size_t> sample_sentences(std::size_t count) const {
    std::vector<std::size_t> samples;
    if (data_.test_corpora.empty()) {
      for (std::size_t i = 0; i < std::min<std::size_t>(count, 3); ++i) samples.push_back(i);
      return samples;
    }
    for (const moa_examples::Corpus corpus : {moa_examples::Corpus::ding, moa_examples::Corpus::libreoffice}) {
      int taken = 0;
      for (std::size_t i = 0; i < count && taken < 2; ++i) {
        const std::size_t words = moa_examples::detail::count_words(data_.test_references[i]);
        if (data_.test_corpora[i] == corpus && words >= 4 && words <= 12) {
          samples.push_back(i);
          ++taken;
        }
      }
    }
    return samples;
  }

  // Expert loads per layer and the tokens each expert prefers (PMI), over the validation split;
  // for MoH, its routed heads.
  void analyse_experts() {
    model_.set_training(false);
    struct Site {
      std::string name;
      const moa::Router<float>* router;
      bool encoder;
    };
    std::vector<Site> sites;
    model_.for_each_attention([&](const moa::AttentionSite& site, const Attention& attention) {
      sites.push_back({site.name, &attention.router, site.queries_from_source});
    });
    const Index experts = sites.front().router->config().num_experts;
    std::vector<moa_examples::ExpertTokenStatistics> statistics(sites.size(), moa_examples::ExpertTokenStatistics(experts));
    // The same routing paired with the batch's tokens shuffled: the information a token-blind router
    // would show on a sample of this size.
    std::vector<moa_examples::ExpertTokenStatistics> shuffled(sites.size(), moa_examples::ExpertTokenStatistics(experts));
    moa::Rng order(0), shuffling(kBootstrapSeed);
    auto shuffle = [&](moa::TokenIds tokens, const moa::SequenceBatch& batch) {
      std::vector<std::size_t> routed;  // padding rows are not routed and keep their place
      for (std::size_t row = 0; row < tokens.size(); ++row)
        if (batch.is_token(static_cast<Index>(row))) routed.push_back(row);
      for (std::size_t i = routed.size(); i > 1; --i) std::swap(tokens[routed[i - 1]], tokens[routed[shuffling.below(i)]]);
      return tokens;
    };
    for (const auto& indices : moa::make_token_batches(data_.valid, options_.batch_tokens, order)) {
      const auto batch = moa::make_seq2seq_batch(data_.valid, indices);
      model_.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, dropout_rng_);
      for (std::size_t s = 0; s < sites.size(); ++s) {
        const moa::TokenIds& tokens = sites[s].encoder ? batch.source : batch.target_input;
        const moa::SequenceBatch& rows = sites[s].encoder ? batch.source_batch : batch.target_batch;
        const auto& router = *sites[s].router;
        statistics[s].add(tokens, router.experts(), router.tokens());
        shuffled[s].add(shuffle(tokens, rows), router.experts(), router.tokens());
      }
    }
    std::ofstream report(folder_ + "/experts.txt");
    report << "Expert analysis of " << result_.spec << " on the validation split\n"
           << "PMI(token, expert) = log p(token, expert) / (p(token) p(expert)), over each token's assignments;\n"
           << "a token always routed to an expert has the largest PMI, log 1 / (k p(expert)); ties list frequent\n"
           << "tokens first; tokens seen at least 5 times; (PMI, count) after each token\n";
    std::vector<std::string> rows, columns;
    std::vector<std::vector<double>> loads;
    for (Index e = 0; e < experts; ++e) columns.push_back("E" + std::to_string(e));
    for (std::size_t s = 0; s < sites.size(); ++s) {
      rows.push_back(sites[s].name);
      loads.push_back(statistics[s].loads());
      char information[160];
      std::snprintf(information, sizeof information,
                    "mutual information(token; expert) %.3f nats, with the tokens shuffled %.3f",
                    statistics[s].mutual_information(), shuffled[s].mutual_information());
      report << "\n== " << sites[s].name << " (" << statistics[s].total() << " assignments; " << information << ")\n";
      result_.mutual_information.push_back({sites[s].name, statistics[s].mutual_information(), shuffled[s].mutual_information()});
      for (Index e = 0; e < experts; ++e) {
        char load[32];
        std::snprintf(load, sizeof load, "%5.1f%%", 100.0 * loads.back()[static_cast<std::size_t>(e)]);
        report << "expert " << e << " load " << load << ":";
        for (const auto& entry : statistics[s].top_tokens(e, 8, 5)) {
          char pmi[32];
          std::snprintf(pmi, sizeof pmi, "%.2f", entry.pmi);
          report << "  " << data_.piece(entry.token) << " (" << pmi << ", " << entry.count << ")";
        }
        report << "\n";
      }
    }
    for (auto& row : loads)
      for (double& value : row) value = std::round(1000.0 * value) / 10.0;  // percent, one decimal
    moa_examples::write_heatmap(folder_ + "/expert_load.svg", "Expert load (% of assignments) on valid, " + result_.spec, rows,
                       columns, loads);
    double mean = 0, mean_shuffled = 0;
    for (const auto& site : result_.mutual_information) {
      mean += site.tokens / static_cast<double>(sites.size());
      mean_shuffled += site.shuffled / static_cast<double>(sites.size());
    }
    std::fprintf(stderr, "[%s] specialisation: mutual information(token; expert) %.3f nats on average over %zu routed sites, %.3f with the tokens shuffled\n",
                 result_.name.c_str(), mean, sites.size(), mean_shuffled);
    std::fprintf(stderr, "[%s] expert report: %s/experts.txt, heatmap: %s/expert_load.svg\n", result_.name.c_str(),
                 folder_.c_str(), folder_.c_str());
  }

  bool concurrent_;  // trained beside another run: plain progress lines
  const Options& options_;
  const Data& data_;
  std::string folder_;
  moa::TransformerConfig config_;
  moa::Rng init_rng_;
  Model model_;
  moa::ParameterList<float> parameters_;
  moa::Adam<float> adam_;
  moa::InverseSqrtSchedule schedule_;
  moa::Rng dropout_rng_;
  RunResult result_;
  moa::ComputePtr compute_;
  std::optional<moa_examples::TrainingLoop<float>> loop_;
  long long first_step_ = 0;
};

// A run of either attention kind, prepared (resume included) before any run trains.
struct PreparedRun {
  std::string name;  // MoA or MHA
  std::function<RunResult()> train_and_evaluate;
};

template <typename Attention>
PreparedRun prepare(const Options& options, const Data& data, const std::string& spec, const std::string& folder,
                    bool concurrent) {
  auto run = std::make_shared<Run<Attention>>(options, data, spec, folder, concurrent);
  run->prepare();
  return {run->name(), [run] { return run->train_and_evaluate(); }};
}

PreparedRun prepare_run(const Options& options, const Data& data, const std::string& spec, const std::string& folder,
                        bool concurrent) {
  switch (moa::AttentionSpec::parse(spec).kind) {
    case moa::AttentionSpec::Kind::moa:
      return prepare<moa::MixtureOfAttention<float>>(options, data, spec, folder, concurrent);
    case moa::AttentionSpec::Kind::moh:
      return prepare<moa::MixtureOfHeads<float>>(options, data, spec, folder, concurrent);
    case moa::AttentionSpec::Kind::mha:
      break;
  }
  return prepare<moa::MultiHeadAttention<float>>(options, data, spec, folder, concurrent);
}

// The paired bootstrap p-value of the first run's BLEU against the second's; NaN without two runs.
double paired_p_value(const std::vector<RunResult>& results) {
  if (results.size() != 2 || results[0].hypotheses.empty()) return std::nan("");
  moa::Rng resampling(kBootstrapSeed);
  return moa::paired_bootstrap_bleu(results[0].hypotheses, results[1].hypotheses, results[0].references, resampling)
      .p_value;
}

// Every number of the final table, for scripts (the demo's check, the README's experiments).
void write_results(const std::string& path, const std::vector<RunResult>& results, double p_value) {
  nlohmann::json runs = nlohmann::json::array();
  for (const auto& r : results) {
    nlohmann::json run{{"model", r.name},
                       {"attention", r.spec},
                       {"parameters", r.parameters},
                       {"macs_per_token", r.macs},
                       {"tokens_per_second", r.tokens_per_second},
                       {"valid_loss", r.valid_loss},
                       {"bleu", r.bleu_beam},
                       {"bleu_interval", {r.bleu_interval.lower, r.bleu_interval.upper}},
                       {"bleu_greedy", r.bleu_greedy},
                       {"chrf", r.chrf},
                       {"test_sentences", r.hypotheses.size()}};
    for (const auto& entry : r.bleu_by_corpus)
      run["bleu_by_corpus"][entry.corpus] = {{"bleu", entry.bleu}, {"sentences", entry.sentences}};
    for (const auto& site : r.mutual_information)
      run["mutual_information"][site.site] = {{"tokens", site.tokens}, {"shuffled", site.shuffled}};
    runs.push_back(run);
  }
  nlohmann::json document{{"runs", runs}};
  if (!std::isnan(p_value)) document["paired_bootstrap_p"] = p_value;
  std::ofstream file(path);
  MOA_CHECK(file.good(), "translate", "cannot write '", path, "'");
  file << document.dump(2) << '\n';
}

void print_table(const std::vector<RunResult>& results, const std::string& chart, const std::string& results_path,
                 double p_value) {
  std::printf("\n%-6s %-22s %11s %12s %9s %11s %10s %11s %7s\n", "model", "attention", "parameters", "MACs/token",
              "tokens/s", "valid loss", "BLEU beam", "BLEU greedy", "chrF");
  for (const auto& r : results)
    std::printf("%-6s %-22s %11lld %11.2fM %9.0f %11.3f %10.2f %11.2f %7.2f\n", r.name.c_str(), r.spec.c_str(),
                static_cast<long long>(r.parameters), r.macs / 1e6, r.tokens_per_second, r.valid_loss, r.bleu_beam,
                r.bleu_greedy, r.chrf);
  for (const auto& r : results)
    std::printf("%s BLEU (beam) %.2f, 95%% bootstrap interval [%.2f, %.2f] over %zu test sentences\n", r.name.c_str(),
                r.bleu_beam, r.bleu_interval.lower, r.bleu_interval.upper, r.hypotheses.size());
  for (const auto& r : results) {
    if (r.bleu_by_corpus.empty()) continue;
    std::printf("%s BLEU (beam) by corpus:", r.name.c_str());
    for (const auto& entry : r.bleu_by_corpus)
      std::printf(" %s %.2f (%zu sentences)", entry.corpus.c_str(), entry.bleu, entry.sentences);
    std::printf("\n");
  }
  if (!std::isnan(p_value))
    std::printf("paired bootstrap (1000 resamples): %s - %s = %+.2f BLEU, p = %.3f%s\n", results[0].name.c_str(),
                results[1].name.c_str(), results[0].bleu_beam - results[1].bleu_beam, p_value,
                p_value < 0.05 ? " (significant at 0.05)" : " (not significant at 0.05)");
  std::printf("\nplots: %s", chart.c_str());
  for (const auto& r : results) {
    std::printf(", %s/loss.svg", r.folder.c_str());
    if (r.name == "MoA") std::printf(", %s/expert_load.svg", r.folder.c_str());
  }
  std::printf("\nhypotheses: ");
  for (const auto& r : results) std::printf("%s/test.hyp ", r.folder.c_str());
  std::printf("\nresults: %s\n", results_path.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  moa_examples::keep_freed_memory();
  moa_examples::MpiSession mpi(argc, argv, "translate");
  Options options;
  options.world = mpi.world();
  CLI::App app{"Train MoA (and an MHA baseline) on German-to-English translation"};
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a later flag overrides
  app.add_option("--attention", options.attention, "attention spec: moa:<k>K<E>E<d_h>D[:raw] (raw: gates not renormalised), moa-ec:<k>K<E>E<d_h>D[:largest] (expert choice in the encoder), moh:<h_s>S<k>K<h_r>H<d_h>D (Mixture-of-Head attention) or mha:<h>H<d_h>D")
      ->capture_default_str();
  app.add_option("--baseline", options.baseline, "a second spec to train and compare (e.g. mha:4H32D)");
  app.add_option("--spans", options.spans,
                 "JSON file of per-layer, per-expert attention spans for the decoder's self-attention of MoA specs "
                 "(see moa/io/attention_spans.hpp)")
      ->check(CLI::ExistingFile);
  app.add_option("--output", options.output, "output folder")->capture_default_str();
  app.add_option("--corpora", options.corpora, "ding, libreoffice or both (comma-separated)")->capture_default_str()
      ->check(CLI::Validator([](std::string& list) { return moa_examples::corpora_error(list); }, "LIST"));
  app.add_option("--corpus", options.corpus, "Ding dictionary file (Debian package trans-de-en)")->capture_default_str();
  app.add_option("--help-root", options.help_root,
                 "LibreOffice help, with de/ and en-US/ (Debian libreoffice-help-de, libreoffice-help-en-us)")
      ->capture_default_str();
  app.add_option("--data", options.data, "Ding pairs: phrases, sentences or both")->capture_default_str()
      ->check(CLI::IsMember({"phrases", "sentences", "both"}));
  app.add_option("--max-words", options.max_words, "longest pair in words, 0 for any")->capture_default_str()
      ->check(moa_examples::whole_number(0, 100000));
  app.add_flag("--synthetic", options.synthetic, "the built-in reverse-a-sequence task instead of the corpus");
  moa_examples::add_training_flags(app, options, "encoder and decoder layers (each)");
  app.add_option("--label-smoothing", options.label_smoothing, "label smoothing")->capture_default_str()
      ->check(moa_examples::real_number(0.0, 1.0));
  app.add_option("--clip-norm", options.clip_norm, "gradient clipping by global norm, 0 for none")->capture_default_str()
      ->check(moa_examples::real_number(0.0, 1e30));
  app.add_flag("--pre-norm", options.pre_norm, "pre-LN instead of post-LN");
  app.add_option("--tokenizer", options.tokenizer_type, "unigram or bpe")->capture_default_str()
      ->check(CLI::IsMember({"unigram", "bpe"}));
  app.add_option("--checkpoint-every", options.checkpoint_every, "checkpoint every N steps")->capture_default_str()
      ->check(moa_examples::whole_number(1, moa_examples::kMaxSteps));
  app.add_option("--average-checkpoints", options.average_checkpoints,
                 "evaluate the mean of the last N checkpoints' parameters (kept in <run>/snapshots/)")
      ->capture_default_str()->check(moa_examples::whole_number(1, 1000));
  app.add_option("--eval-sentences", options.eval_sentences, "test sentences to translate, 0 for all")->capture_default_str()
      ->check(moa_examples::whole_number(0, 1000000000));
  app.add_option("--beam", options.beam, "beam size")->capture_default_str()->check(moa_examples::whole_number(1, 1000));
  app.add_option("--length-penalty", options.length_penalty, "beam length penalty")->capture_default_str()
      ->check(moa_examples::real_number(0.0, 10.0));
  app.add_option("--jobs", options.jobs, "models trained at once (each with --threads threads)")->capture_default_str()
      ->check(moa_examples::whole_number(1, 2));
  CLI11_PARSE(app, argc, argv);
  return moa_examples::run_ranked(options.world, "translate", [&] {
    // Everything that can be checked before any work: specs, sizes, the backend, the folders.
    std::vector<std::string> specs{moa::AttentionSpec::parse(options.attention).to_string()};
    if (!options.baseline.empty()) {
      specs.push_back(moa::AttentionSpec::parse(options.baseline).to_string());
      MOA_CHECK(specs[1] != specs[0], "translate", "--baseline ", options.baseline, " is the same model as --attention ",
                options.attention, ": both runs would write one folder");
    }
    for (const std::string& spec : specs) check_memory(options, spec, options.vocab_size);
    options.compute.make("translate");  // an unavailable backend fails here
    fs::create_directories(options.output);
    const Data data = load_data(options);
    std::vector<RunResult> results;
    auto folder_of = [&](const std::string& spec) {
      std::string name = spec;
      std::replace(name.begin(), name.end(), ':', '_');
      return options.output + "/" + name;
    };
    // Both runs are set up (a resume included) before either trains, so a mistake in the second
    // is reported at once. The runs share nothing but the read-only data, so training them at
    // once changes no number.
    std::vector<PreparedRun> prepared;
    // Under mpirun the ranks train each model together, one model after the other.
    const bool concurrent = options.jobs > 1 && specs.size() > 1 && !options.world.is_parallel();
    if (specs.size() > 1 && options.world.is_parallel() && options.world.is_root())
      std::fprintf(stderr, "translate: note: under mpirun the two models train one after the other, each on all %d ranks\n",
                   options.world.size());
    for (const std::string& spec : specs) {
      check_memory(options, spec, data.vocab_size);
      prepared.push_back(prepare_run(options, data, spec, folder_of(spec), concurrent));
    }
    results.resize(specs.size());
    std::vector<std::exception_ptr> failures(specs.size());
    auto run_at = [&](std::size_t i) {
      try {
        results[i] = prepared[i].train_and_evaluate();
      } catch (const std::exception& error) {  // which of the two runs failed
        failures[i] = std::make_exception_ptr(moa::Error("[" + prepared[i].name + "] " + error.what()));
      }
    };
    if (concurrent) {
      std::thread baseline(run_at, 1);
      run_at(0);
      baseline.join();
    } else {
      for (std::size_t i = 0; i < specs.size(); ++i) {
        run_at(i);
        // A rank must not go on to the next model while the others still train this one.
        if (failures[i] && options.world.is_parallel()) std::rethrow_exception(failures[i]);
      }
    }
    for (const auto& failure : failures)
      if (failure) std::rethrow_exception(failure);
    if (!options.world.is_root()) return 0;  // rank 0 writes the charts and the results
    std::vector<moa_examples::PlotSeries> curves;
    const char* colors[2] = {"#1f77b4", "#d62728"};
    for (std::size_t i = 0; i < results.size(); ++i) {
      curves.push_back({results[i].name + " " + kTrainCurve, results[i].steps, results[i].train_nlls, colors[i], true});
      curves.push_back({results[i].name + " valid", results[i].valid_steps, results[i].valid_losses, colors[i], false});
    }
    const std::string chart = options.output + "/loss.svg";
    moa_examples::write_line_chart(chart, "Translation loss: " + options.attention + (options.baseline.empty() ? "" : " vs " + options.baseline),
                          "step", "loss (nats/token)", curves);
    const double p_value = paired_p_value(results);
    const std::string results_path = options.output + "/results.json";
    write_results(results_path, results, p_value);
    print_table(results, chart, results_path, p_value);
    return 0;
  });
}
