// Masked language modelling on the English side of the translation data (the Ding dictionary's
// sentences and LibreOffice's help), or on any text file, one sentence a line: an encoder with MoA or multi-head attention and an output projection tied to
// the embeddings. 15% of the tokens are chosen; of those 80% become <mask>, 10% a random token and
// 10% stay. Reports masked-token accuracy and perplexity on valid and test.
//
//     mlm --attention moa:4K8E48D --baseline mha:4H32D --steps 1000 --output runs/mlm
//     mlm --text my_corpus.txt --steps 500
#include "moa/io/checkpoint.hpp"
#include "common/parallel_corpus.hpp"
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
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Index = moa::Index;

struct Options {
  std::string attention = "moa:4K8E48D";
  std::string baseline;
  std::string output = "runs/mlm";
  std::string corpora = "ding,libreoffice";
  std::string corpus = "/usr/share/trans/de-en";
  std::string help_root = "/usr/share/libreoffice/help";
  std::string text;
  std::uint64_t seed = 1;
  long long steps = 1000;
  Index batch_tokens = 2048;
  double learning_rate = 1e-3;
  long long warmup = 200;
  double dropout = 0.1;
  Index model_dim = 128;
  Index ffn_dim = 256;
  Index layers = 2;
  Index vocab_size = 2000;
  Index max_tokens = 48;
  bool resume = false;
  bool reuse_tokenizer = false;
  long long valid_every = 100;
  std::string on_divergence = "stop";
  moa_examples::ComputeOptions compute;
  moa_examples::Distributed world;  // the ranks under mpirun (data parallel); one process otherwise
};

struct Data {
  std::vector<moa::TokenIds> splits[3];  // train, valid, test
  std::unique_ptr<moa::SentencePieceTokenizer> tokenizer;
  Index mask_id = 0;
};

Data load_data(const Options& options) {
  std::vector<std::string> lines[3];
  if (!options.text.empty()) {
    std::error_code error;
    MOA_CHECK(!fs::is_directory(options.text, error), "mlm", "--text '", options.text, "' is a directory, not a file");
    std::ifstream file(options.text);
    MOA_CHECK(file.good(), "mlm", "cannot open '", options.text, "': ", std::strerror(errno));
    for (std::string line; std::getline(file, line);)
      if (!line.empty()) lines[static_cast<int>(moa_examples::split_of(line))].push_back(line);
  } else {
    moa_examples::ParallelCorpusOptions corpus;
    moa_examples::choose_corpora(corpus, options.corpora);
    corpus.ding_path = options.corpus;
    corpus.help_root = options.help_root;
    corpus.ding_options.phrases = false;
    // Each distinct English sentence once, split by its own text.
    std::set<std::string> seen;
    for (const auto& split : moa_examples::load_parallel_corpus(corpus))
      for (const auto& example : split)
        if (seen.insert(example.pair.target).second)
          lines[static_cast<int>(moa_examples::split_of(example.pair.target))].push_back(example.pair.target);
  }
  const char* names[3] = {"train", "valid", "test"};
  for (int s = 0; s < 3; ++s) MOA_CHECK(!lines[s].empty(), "mlm", "the ", names[s], " split is empty");
  Data data;
  const std::string prefix = options.output + "/spm";
  const std::string tokenizer_flags = "--vocab-size " + std::to_string(options.vocab_size) +
                                      (options.text.empty() ? " --corpora " + options.corpora + " --corpus " + options.corpus
                                                             : " --text " + options.text);
  // Rank 0 trains it (or checks the one there) and the other ranks receive it.
  const bool train_tokenizer = options.world.is_root() && moa_examples::tokenizer_needs_training(
      "mlm", prefix, tokenizer_flags, options.reuse_tokenizer, options.vocab_size,
      [](const std::string& path) { return moa::SentencePieceTokenizer(path).vocab_size(); });
  if (train_tokenizer) moa::SentencePieceTokenizer::train(lines[0], prefix, options.vocab_size, "unigram", {"<mask>"});
  moa_examples::share_file(options.world, prefix + ".model");
  data.tokenizer = std::make_unique<moa::SentencePieceTokenizer>(prefix + ".model");
  if (train_tokenizer)
    moa_examples::record_tokenizer("mlm", prefix, tokenizer_flags, options.vocab_size, data.tokenizer->vocab_size());
  data.mask_id = data.tokenizer->id_of("<mask>");
  for (int s = 0; s < 3; ++s)
    for (const auto& line : lines[s]) {
      moa::TokenIds ids = data.tokenizer->encode(line);
      if (!ids.empty() && static_cast<Index>(ids.size()) < options.max_tokens) data.splits[s].push_back(std::move(ids));
    }
  for (int s = 0; s < 3; ++s)
    MOA_CHECK(!data.splits[s].empty(), "mlm", "no ", names[s], " sentence is shorter than --max-tokens ",
              options.max_tokens, " tokens");
  if (options.world.is_root())
    std::fprintf(stderr, "mlm: %zu train / %zu valid / %zu test sentences%s\n", data.splits[0].size(),
                 data.splits[1].size(), data.splits[2].size(), moa_examples::data_parallel_note(options.world).c_str());
  return data;
}

// A padded batch with BERT's masking: inputs, targets (-1 where not predicted) and the batch shape.
struct MaskedBatch {
  moa::TokenIds inputs, targets;
  moa::SequenceBatch batch;
};

MaskedBatch mask_batch(const std::vector<moa::TokenIds>& sequences, const std::vector<std::size_t>& indices,
                       Index mask_id, Index vocab_size, moa::Rng& rng) {
  MaskedBatch result;
  Index length = 0;
  std::vector<Index> lengths;
  for (std::size_t i : indices) {
    lengths.push_back(static_cast<Index>(sequences[i].size()));
    length = std::max(length, lengths.back());
  }
  result.batch = moa::SequenceBatch::padded(length, lengths);
  for (std::size_t i : indices) {
    const moa::TokenIds& ids = sequences[i];
    // Choose 15% of the positions, at least one, so every sequence predicts something.
    std::vector<char> chosen(ids.size());
    bool any = false;
    for (char& flag : chosen) any = (flag = rng.uniform() < 0.15) || any;
    if (!any) chosen[static_cast<std::size_t>(rng.below(ids.size()))] = 1;
    for (std::size_t t = 0; t < static_cast<std::size_t>(length); ++t) {
      if (t >= ids.size() || !chosen[t]) {
        result.inputs.push_back(t < ids.size() ? ids[t] : moa::kPadId);
        result.targets.push_back(-1);
        continue;
      }
      const double kind = rng.uniform();
      const Index random_token =
          moa::kFirstRegularId + 1 + static_cast<Index>(rng.below(static_cast<std::uint64_t>(vocab_size - moa::kFirstRegularId - 1)));
      result.inputs.push_back(kind < 0.8 ? mask_id : kind < 0.9 ? random_token : ids[t]);
      result.targets.push_back(ids[t]);
    }
  }
  return result;
}

std::vector<moa::TokenPair> as_pairs(const std::vector<moa::TokenIds>& sequences) {
  std::vector<moa::TokenPair> pairs;
  for (const auto& ids : sequences) pairs.push_back({ids, {}});
  return pairs;
}

struct Evaluation {
  double loss = 0, accuracy = 0;
};

struct RunResult {
  std::string name, spec, folder;
  Index parameters = 0;
  double tokens_per_second = 0;
  Evaluation valid, test;
};

// Refuses a model too large for this machine before anything is allocated.
void check_memory(const Options& options, const std::string& spec, Index vocab_size) {
  const moa::AttentionSpec attention = moa::AttentionSpec::parse(spec);
  const double d = static_cast<double>(options.model_dim), ffn = static_cast<double>(options.ffn_dim);
  const double layers = static_cast<double>(options.layers), vocab = static_cast<double>(vocab_size);
  const double parameters = vocab * d + layers * (moa_examples::attention_parameters(attention, d) + 2.0 * d * ffn);
  const double activations =
      layers * (moa_examples::attention_activations(attention, d, static_cast<double>(options.max_tokens)) + 2.0 * ffn) +
      2.0 * vocab;
  moa_examples::check_memory("mlm", parameters, static_cast<double>(options.batch_tokens), activations);
}

// Trains and evaluates one model; with check_only, stops after the setup (the resume included), so
// that a mistake in a later run is reported before an earlier one trains.
template <typename Attention>
RunResult run(const Options& options, const Data& data, const std::string& spec, bool check_only = false) {
  RunResult result;
  result.spec = spec;
  result.folder = options.output + "/" + spec.substr(0, 3) + "_" + spec.substr(4);
  fs::create_directories(result.folder);
  moa::TransformerConfig config;
  config.vocab_size = data.tokenizer->vocab_size();
  config.model_dim = options.model_dim;
  config.ffn_dim = options.ffn_dim;
  config.encoder_layers = options.layers;
  config.dropout = options.dropout;
  config.attention = moa::AttentionSpec::parse(spec);
  result.name = config.attention.kind_name();
  moa::Rng init(options.seed), rng(options.seed + 1);
  moa::MaskedLM<Attention> model(config, init);
  const moa::ComputePtr compute = options.compute.make("mlm");
  model.set_compute(compute);
  auto parameters = moa::parameters_of(model);
  result.parameters = parameters.numel();
  moa::Adam<float> adam(parameters, {0.9, 0.98, 1e-9, 0.01, true});
  adam.set_compute(compute);
  moa::InverseSqrtSchedule schedule(options.learning_rate, options.warmup);
  const std::string describe = spec + " d" + std::to_string(config.model_dim) + " layers" + std::to_string(config.encoder_layers) +
                               " vocab" + std::to_string(config.vocab_size);
  moa_examples::TrainingSettings settings;
  settings.name = result.name;
  settings.folder = result.folder;
  settings.config = describe;
  settings.steps = options.steps;
  settings.valid_every = options.valid_every;
  settings.checkpoint_every = options.valid_every;
  settings.seed = options.seed;
  settings.batch_tokens = options.batch_tokens;
  settings.clip_norm = 1.0;
  settings.resume = options.resume;
  settings.on_divergence =
      options.on_divergence == "skip" ? moa_examples::OnDivergence::skip : moa_examples::OnDivergence::stop;
  settings.distributed = options.world;
  moa_examples::TrainingLoop<float> loop(settings, parameters, adam, schedule, rng);
  const long long first_step = loop.restore();
  if (check_only) return result;
  const auto train = as_pairs(data.splits[0]);

  // `shared`: every rank is here (validation during training) and takes its share of the batches
  // (batch i on rank i mod N; each rank draws every batch's masks, so they are those of one
  // process); the sums are combined.
  auto evaluate = [&](const std::vector<moa::TokenIds>& sequences, bool shared) {
    model.set_training(false);
    moa::Rng masking(12345), order(0);  // the same masks every time
    moa::CrossEntropyLoss<float> loss(0.0, -1);
    loss.set_compute(compute);
    const auto pairs = as_pairs(sequences);
    const moa_examples::Distributed& world = options.world;
    double sums[3] = {0, 0, 0};  // NLL, correct, counted
    double& nll = sums[0];
    double& correct = sums[1];
    double& counted = sums[2];
    const auto batches = moa::make_token_batches(pairs, options.batch_tokens, order);
    for (std::size_t b = 0; b < batches.size(); ++b) {
      const MaskedBatch batch = mask_batch(sequences, batches[b], data.mask_id, config.vocab_size, masking);
      if (shared && b % static_cast<std::size_t>(world.size()) != static_cast<std::size_t>(world.rank())) continue;
      const moa::Matrix<float> logits = model.forward(batch.inputs, batch.batch, rng);
      loss.forward(logits, batch.targets);
      nll += loss.nll() * static_cast<double>(loss.counted());
      counted += static_cast<double>(loss.counted());
      for (Index row = 0; row < logits.rows(); ++row) {
        if (batch.targets[static_cast<std::size_t>(row)] < 0) continue;
        Index predicted = 0;
        logits.row(row).maxCoeff(&predicted);
        correct += predicted == batch.targets[static_cast<std::size_t>(row)];
      }
    }
    if (shared) world.sum(sums, 3);
    return Evaluation{nll / counted, correct / counted};
  };

  moa::CrossEntropyLoss<float> loss_function(0.0, -1);
  loss_function.set_compute(compute);
  auto train_step = [&](const std::vector<std::size_t>& indices, moa::Rng& step_rng, const moa_examples::Combine& combine) {
    model.set_training(true);
    const MaskedBatch batch = mask_batch(data.splits[0], indices, data.mask_id, config.vocab_size, step_rng);
    moa_examples::StepReport report;
    report.loss = loss_function.forward(model.forward(batch.inputs, batch.batch, step_rng), batch.targets);
    report.tokens = static_cast<double>(batch.batch.tokens());
    report.values = {{"train_nll", loss_function.nll()}, {"aux_loss", model.aux_loss()}};
    const double factor = combine(report, static_cast<double>(loss_function.counted()));
    model.backward(loss_function.backward(static_cast<float>(factor)));
    return report;
  };
  auto validate = [&]() -> std::vector<std::pair<std::string, double>> {
    result.valid = evaluate(data.splits[1], true);
    return {{"valid_loss", result.valid.loss}, {"valid_accuracy", result.valid.accuracy}};
  };
  loop.run(first_step, train, train_step, validate);
  result.tokens_per_second = loop.tokens_per_second();
  if (!options.world.is_root()) return result;  // rank 0 evaluates and writes the results
  const moa_examples::TrainingCurves curves = loop.curves();
  result.test = evaluate(data.splits[2], false);  // rank 0 alone
  moa_examples::write_line_chart(result.folder + "/loss.svg", result.name + " " + spec + ": masked-token loss", "step",
                        "loss (nats/token)",
                        {{"train NLL (dropout on)", curves.steps, curves.train_nlls, "#1f77b4", false},
                         {"valid", curves.valid_steps, curves.valid_losses, "#d62728", false}});
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  moa_examples::keep_freed_memory();
  moa_examples::MpiSession mpi(argc, argv, "mlm");
  Options options;
  options.world = mpi.world();
  CLI::App app{"Masked language modelling with MoA (and an MHA baseline)"};
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("--attention", options.attention, "attention spec: moa:<k>K<E>E<d_h>D[:raw] (raw: gates not renormalised), moa-ec:<k>K<E>E<d_h>D[:largest] (expert choice in the encoder), moh:<h_s>S<k>K<h_r>H<d_h>D (Mixture-of-Head attention) or mha:<h>H<d_h>D")
      ->capture_default_str();
  app.add_option("--baseline", options.baseline, "a second spec to train and compare");
  app.add_option("--output", options.output, "output folder")->capture_default_str();
  app.add_option("--corpora", options.corpora, "whose English side is the text: ding, libreoffice or both (comma-separated)")
      ->capture_default_str()->check(CLI::Validator([](std::string& list) { return moa_examples::corpora_error(list); }, "LIST"));
  app.add_option("--corpus", options.corpus, "Ding dictionary (Debian package trans-de-en)")->capture_default_str();
  app.add_option("--help-root", options.help_root,
                 "LibreOffice help, with de/ and en-US/ (Debian libreoffice-help-de, libreoffice-help-en-us)")
      ->capture_default_str();
  app.add_option("--text", options.text, "a text file, one sentence a line, instead of the corpora");
  moa_examples::add_training_flags(app, options, "encoder layers");
  CLI11_PARSE(app, argc, argv);
  return moa_examples::run_ranked(options.world, "mlm", [&] {
    // Everything that can be checked before any work: specs, sizes, the backend, the folders.
    std::vector<std::string> specs{moa::AttentionSpec::parse(options.attention).to_string()};
    if (!options.baseline.empty()) {
      specs.push_back(moa::AttentionSpec::parse(options.baseline).to_string());
      MOA_CHECK(specs[1] != specs[0], "mlm", "--baseline ", options.baseline, " is the same model as --attention ",
                options.attention, ": both runs would write one folder");
    }
    for (const std::string& spec : specs) check_memory(options, spec, options.vocab_size);
    options.compute.make("mlm");  // an unavailable backend fails here
    fs::create_directories(options.output);
    const Data data = load_data(options);
    auto run_spec = [&](const std::string& spec, bool check_only) {
      check_memory(options, spec, data.tokenizer->vocab_size());
      switch (moa::AttentionSpec::parse(spec).kind) {
        case moa::AttentionSpec::Kind::moa:
          return run<moa::MixtureOfAttention<float>>(options, data, spec, check_only);
        case moa::AttentionSpec::Kind::moh:
          return run<moa::MixtureOfHeads<float>>(options, data, spec, check_only);
        case moa::AttentionSpec::Kind::mha:
          break;
      }
      return run<moa::MultiHeadAttention<float>>(options, data, spec, check_only);
    };
    for (const std::string& spec : specs) run_spec(spec, true);  // every setup, before any training
    std::vector<RunResult> results;
    for (const std::string& spec : specs) results.push_back(run_spec(spec, false));
    if (!options.world.is_root()) return 0;  // rank 0 prints and writes the results
    std::printf("\n%-6s %-22s %11s %9s %11s %10s %10s %10s\n", "model", "attention", "parameters", "tokens/s",
                "valid ppl", "valid acc", "test ppl", "test acc");
    for (const auto& r : results)
      std::printf("%-6s %-22s %11lld %9.0f %11.2f %9.1f%% %10.2f %9.1f%%\n", r.name.c_str(), r.spec.c_str(),
                  static_cast<long long>(r.parameters), r.tokens_per_second, std::exp(r.valid.loss),
                  100 * r.valid.accuracy, std::exp(r.test.loss), 100 * r.test.accuracy);
    // Every number of the table, for scripts (the README's experiments).
    nlohmann::json runs = nlohmann::json::array();
    for (const auto& r : results)
      runs.push_back({{"model", r.name},
                      {"attention", r.spec},
                      {"parameters", r.parameters},
                      {"tokens_per_second", r.tokens_per_second},
                      {"valid_loss", r.valid.loss},
                      {"valid_accuracy", r.valid.accuracy},
                      {"test_loss", r.test.loss},
                      {"test_accuracy", r.test.accuracy},
                      {"seed", options.seed}});
    const std::string results_path = options.output + "/results.json";
    std::ofstream results_file(results_path);
    MOA_CHECK(results_file.good(), "mlm", "cannot write '", results_path, "'");
    results_file << nlohmann::json{{"runs", runs}}.dump(2) << '\n';
    std::printf("results: %s\n", results_path.c_str());
    return 0;
  });
}
