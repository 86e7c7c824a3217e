#include "support.hpp"

#include "common/plot.hpp"
#include "moa/text/batching.hpp"
#include "common/training.hpp"
#include "common/training_loop.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

using namespace moa_test;

TEST_CASE("ExpertTokenStatistics: loads and PMI of a hand-computed case", "[training]") {
  moa_examples::ExpertTokenStatistics statistics(2);
  statistics.add({5, 5, 6, 6}, {0, 0, 0, 1}, {0, 1, 2, 3});
  REQUIRE(statistics.total() == 4);
  REQUIRE(statistics.loads() == std::vector<double>{0.75, 0.25});
  // p(5, e0) = 1/2, p(5) = 1/2, p(e0) = 3/4: log 4/3. p(6, e1) = 1/4, p(6) = 1/2, p(e1) = 1/4: log 2.
  const auto first = statistics.top_tokens(0, 5, 1);
  REQUIRE(first.size() == 2);
  REQUIRE(first[0].token == 5);
  REQUIRE(first[0].pmi == Approx(std::log(4.0 / 3)));
  REQUIRE(first[0].count == 2);
  REQUIRE(statistics.top_tokens(1, 5, 1)[0].pmi == Approx(std::log(2.0)));
  REQUIRE(statistics.top_tokens(1, 5, 3).empty());  // token 6 was seen twice, fewer than 3
  moa_examples::ExpertTokenStatistics empty(3);
  REQUIRE(empty.top_tokens(2, 5, 1).empty());
  REQUIRE_MOA_ERROR(statistics.add({5}, {0, 1}, {0}), "got 2 experts for 1 assignment rows");
  REQUIRE_MOA_ERROR(statistics.add({5}, {2}, {0}), "expert 2 is outside [0, 2)");
  REQUIRE_MOA_ERROR(statistics.add({5}, {1}, {1}), "row 1 is outside [0, 1)");
  REQUIRE_MOA_ERROR(statistics.top_tokens(2, 5, 1), "expert 2 is outside [0, 2)");
  REQUIRE(statistics.mutual_information() ==
          Approx(0.5 * std::log(4.0 / 3) + 0.25 * std::log(2.0 / 3) + 0.25 * std::log(2.0)));
  // Routing that ignores the token: no information.
  moa_examples::ExpertTokenStatistics independent(2);
  independent.add({5, 5, 6, 6}, {0, 1, 0, 1}, {0, 1, 2, 3});
  REQUIRE(std::abs(independent.mutual_information()) < 1e-15);
}

TEST_CASE("ExpertTokenStatistics: equal PMI lists the more frequent token first, exactly", "[training]") {
  // Tokens 7 (3 times) and 8 (6 times) always go to expert 0 (with 9 once): equal PMI, 8 first.
  moa_examples::ExpertTokenStatistics statistics(3);
  statistics.add({7, 7, 7, 8, 8, 8, 8, 8, 8, 9, 9, 9}, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2},
                 {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  const auto top = statistics.top_tokens(0, 3, 1);
  REQUIRE(top.size() == 3);
  REQUIRE(top[0].token == 8);
  REQUIRE(top[1].token == 7);
  REQUIRE(top[0].pmi == Approx(top[1].pmi));
  REQUIRE(top[2].token == 9);
}

TEST_CASE("moving_average and the SVG writers", "[training]") {
  REQUIRE(moa_examples::moving_average({1, 3, 5, 7}, 2) == std::vector<double>{1, 2, 4, 6});
  REQUIRE_MOA_ERROR(moa_examples::moving_average({1}, 0), "window must be positive");
  const std::string chart = temporary_path("chart.svg");
  moa_examples::write_line_chart(chart, "t", "x", "y", {{"a", {1, 2, 3}, {3, 2, 1}, "red", false}});
  std::ifstream file(chart);
  const std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  REQUIRE(text.find("<polyline") != std::string::npos);
  REQUIRE(text.find(">a</text>") != std::string::npos);
  // A series with nothing to draw (a run shorter than the first validation) stays out of the
  // legend; one with a single point gets a dot, since a line of one point shows nothing.
  moa_examples::write_line_chart(chart, "t", "x", "y",
                                 {{"train", {1, 2}, {3, 2}, "red", true},
                                  {"empty", {}, {}, "blue", false},
                                  {"nan", {1}, {std::nan("")}, "blue", false},
                                  {"one", {2}, {2.5}, "green", false}});
  std::ifstream second_file(chart);
  const std::string second((std::istreambuf_iterator<char>(second_file)), std::istreambuf_iterator<char>());
  REQUIRE(second.find(">empty</text>") == std::string::npos);
  REQUIRE(second.find(">nan</text>") == std::string::npos);
  REQUIRE(second.find(">one</text>") != std::string::npos);
  REQUIRE(second.find("<circle") != std::string::npos);
  REQUIRE(second.find("fill='green'") != std::string::npos);
  REQUIRE_MOA_ERROR(moa_examples::write_line_chart(chart, "t", "x", "y", {{"a", {1, 2}, {1}, "red", false}}),
                    "series 'a' has 2 x and 1 y values");
  REQUIRE_MOA_ERROR(moa_examples::write_heatmap(chart, "t", {"r"}, {"c1", "c2"}, {{1.0}}), "a row has 1 values for 2 columns");
  REQUIRE_MOA_ERROR(moa_examples::write_heatmap(temporary_path("no/dir/h.svg"), "t", {"r"}, {"c"}, {{1.0}}), "cannot write");
  // A long row label (a site's parameter prefix) gets a left margin wide enough to show it whole.
  const std::string label = "decoder.layers.1.encoder_attn";
  const std::string heatmap = temporary_path("heatmap.svg");
  moa_examples::write_heatmap(heatmap, "t", {label}, {"c"}, {{1.0}});
  std::ifstream heatmap_file(heatmap);
  const std::string svg((std::istreambuf_iterator<char>(heatmap_file)), std::istreambuf_iterator<char>());
  const auto at = svg.find(">" + label + "</text>");
  REQUIRE(at != std::string::npos);
  const auto x = svg.rfind("<text x='", at);
  const double label_end = std::stod(svg.substr(x + 9));  // text-anchor end
  REQUIRE(label_end - 6.5 * static_cast<double>(label.size()) >= 0.0);
  // ... and a title longer than the cells are wide still fits.
  const std::string title(60, 'x');
  moa_examples::write_heatmap(heatmap, title, {"r"}, {"c"}, {{1.0}});
  std::ifstream titled_file(heatmap);
  const std::string titled((std::istreambuf_iterator<char>(titled_file)), std::istreambuf_iterator<char>());
  REQUIRE(std::stod(titled.substr(titled.find("width='") + 7)) >= 8.5 * 60);
}

TEST_CASE("Seq2Seq batches and token batching", "[training]") {
  const std::vector<moa::TokenPair> pairs{{{4, 5}, {6}}, {{7}, {8, 9, 10}}};
  const auto batch = moa::make_seq2seq_batch(pairs, {0, 1});
  // source + EOS, padded to 3; target input BOS + target, output target + EOS, padded to 4.
  REQUIRE(batch.source == moa::TokenIds{4, 5, 2, 7, 2, 0});
  REQUIRE(batch.target_input == moa::TokenIds{1, 6, 0, 0, 1, 8, 9, 10});
  REQUIRE(batch.target_output == moa::TokenIds{6, 2, 0, 0, 8, 9, 10, 2});
  REQUIRE(batch.target_tokens == 6);
  REQUIRE_MOA_ERROR(moa::make_seq2seq_batch(pairs, {2}), "index 2 is outside [0, 2)");
  moa::Rng rng(1);
  const auto many = moa::synthetic_reverse_task(50, 10, 2, 6, rng);
  std::size_t covered = 0;
  for (const auto& indices : moa::make_token_batches(many, 16, rng)) covered += indices.size();
  REQUIRE(covered == 50);  // every pair in exactly one batch
  REQUIRE_MOA_ERROR(moa::synthetic_reverse_task(-1, 10, 2, 6, rng), "count must be non-negative");
  REQUIRE_MOA_ERROR(moa::make_token_batches(many, 0, rng), "max_tokens must be positive");
}

TEST_CASE("TrainingLoop: trains, checkpoints, resumes, and refuses bad checkpoint metadata", "[training][checkpoint]") {
  const std::string folder = temporary_path("loop");
  std::filesystem::create_directories(folder);
  moa::Rng data_rng(2);
  const auto pairs = moa::synthetic_reverse_task(40, 12, 2, 5, data_rng);
  moa::Rng init(1);
  moa::Linear<float> layer(3, 2, true, init);
  const auto parameters = moa::pack_parameters(layer);
  moa::Adam<float> adam(parameters);
  moa::Rng rng(5);
  moa_examples::TrainingSettings settings;
  settings.folder = folder;
  settings.config = "linear 3x2";
  settings.steps = 6;
  settings.valid_every = 3;
  settings.checkpoint_every = 3;
  settings.batch_tokens = 32;
  // A step that moves the weights toward a fixed target.
  auto step = [&](const std::vector<std::size_t>& batch, moa::Rng&, const moa_examples::Combine& combine) {
    const MatrixF input = MatrixF::Ones(static_cast<Index>(batch.size()), 3);
    const MatrixF output = layer.forward(input);
    moa_examples::StepReport report{0.5 * static_cast<double>(output.squaredNorm()), static_cast<double>(batch.size()), {}};
    const double factor = combine(report, static_cast<double>(batch.size()));
    REQUIRE(factor == 1.0);  // one process
    layer.backward(output * static_cast<float>(factor));
    return report;
  };
  int validations = 0;
  auto validate = [&]() -> std::vector<std::pair<std::string, double>> { return {{"valid_loss", ++validations}}; };
  moa_examples::TrainingLoop<float> loop(settings, parameters, adam, [](long long) { return 0.01; }, rng);
  REQUIRE(loop.restore() == 0);  // not resuming
  // A step must combine its report between forward and backward (data parallel needs it), once.
  auto no_combine = [&](const std::vector<std::size_t>&, moa::Rng&, const moa_examples::Combine&) {
    return moa_examples::StepReport{1.0, 1.0, {}};
  };
  REQUIRE_MOA_ERROR(loop.run(0, pairs, no_combine, validate), "did not call combine(report, loss_targets)");
  auto twice = [&](const std::vector<std::size_t>&, moa::Rng&, const moa_examples::Combine& combine) {
    moa_examples::StepReport report{1.0, 1.0, {}};
    combine(report, 1.0);
    combine(report, 1.0);
    return report;
  };
  REQUIRE_MOA_ERROR(loop.run(0, pairs, twice, validate), "called combine() twice");
  REQUIRE(adam.steps() == 0);
  loop.run(0, pairs, step, validate);
  REQUIRE(validations == 2);
  REQUIRE(adam.steps() == 6);
  REQUIRE(loop.curves().steps.size() == 6);
  REQUIRE(loop.curves().valid_losses == std::vector<double>{1, 2});

  // Resuming restores the step, the optimizer and the generator.
  settings.resume = true;
  settings.steps = 8;
  moa::Rng resumed_rng(0);
  moa::Adam<float> resumed_adam(parameters);
  moa_examples::TrainingLoop<float> resumed(settings, parameters, resumed_adam, [](long long) { return 0.01; }, resumed_rng);
  REQUIRE(resumed.restore() == 6);
  REQUIRE(resumed_adam.steps() == 6);
  REQUIRE(resumed_rng.state() == rng.state());

  // Bad metadata: each a clear error naming the file and the key.
  const std::string path = folder + "/checkpoint.safetensors";
  auto with_metadata = [&](const std::map<std::string, std::string>& metadata) {
    moa::save_checkpoint(path, parameters, adam, metadata);
    moa::Adam<float> fresh(parameters);
    moa::Rng fresh_rng(0);
    moa_examples::TrainingLoop<float> attempt(settings, parameters, fresh, [](long long) { return 0.01; }, fresh_rng);
    attempt.restore();
  };
  const std::string config = "linear 3x2";
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "-5"}, {"rng", "1"}}), "metadata 'step' = -5 is outside [0, ");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "abc"}, {"rng", "1"}}), "'step' = 'abc' is not a whole number");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "99999999999999999999"}, {"rng", "1"}}),
                    "is not a whole number");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "9"}, {"rng", "1"}}),
                    "is at step 9, beyond --steps 8: there is nothing left to train");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "6"}, {"rng", "1"}, {"lr_scale", "nan"}}),
                    "metadata 'lr_scale' = 'nan' is not a number in (0, 1]");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "6"}}), "has no 'rng' in its metadata");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"rng", "1"}}), "has no 'step' in its metadata");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "5"}, {"rng", "1"}}), "is at step 5 but its optimizer at step 6");
  REQUIRE_MOA_ERROR(with_metadata({{"config", config}, {"step", "6"}, {"rng", "x"}}), "'rng' = 'x' is not a generator state");
  REQUIRE_MOA_ERROR(with_metadata({{"config", "other"}, {"step", "6"}, {"rng", "1"}}), "was written with config = 'other'");
  std::filesystem::remove_all(folder);
}

namespace {

// A tiny training setup for the loop's failure tests: a linear layer pulled toward zero, with a
// step that can be told to return a loss (and gradient) that is not finite.
struct LoopFixture {
  std::string folder;
  std::vector<moa::TokenPair> pairs;
  moa::Rng init{1};
  moa::Linear<float> layer{3, 2, true, init};
  moa::ParameterList<float> parameters = moa::pack_parameters(layer);
  moa::Adam<float> adam{parameters};
  moa::Rng rng{5};
  moa_examples::TrainingSettings settings;
  std::set<long long> bad_steps;  // steps whose loss and gradients are NaN
  long long step_count = 0;

  explicit LoopFixture(const std::string& name) : folder(temporary_path(name)) {
    std::filesystem::remove_all(folder);
    std::filesystem::create_directories(folder);
    moa::Rng data_rng(2);
    pairs = moa::synthetic_reverse_task(40, 12, 2, 5, data_rng);
    settings.folder = folder;
    settings.config = "linear 3x2";
    settings.steps = 8;
    settings.valid_every = 100;
    settings.checkpoint_every = 3;
    settings.batch_tokens = 32;
  }

  moa_examples::TrainingLoop<float> loop() {
    return moa_examples::TrainingLoop<float>(settings, parameters, adam, [](long long) { return 0.01; }, rng);
  }

  void run(moa_examples::TrainingLoop<float>& loop, long long first_step) {
    auto step = [&](const std::vector<std::size_t>& batch, moa::Rng&, const moa_examples::Combine& combine) {
      ++step_count;
      const MatrixF input = MatrixF::Ones(static_cast<Index>(batch.size()), 3);
      MatrixF output = layer.forward(input);
      if (bad_steps.count(step_count) != 0) output(0, 0) = std::numeric_limits<float>::quiet_NaN();
      moa_examples::StepReport report{0.5 * static_cast<double>(output.squaredNorm()), static_cast<double>(batch.size()), {}};
      layer.backward(output * static_cast<float>(combine(report, static_cast<double>(batch.size()))));
      return report;
    };
    loop.run(first_step, pairs, step, [] { return std::vector<std::pair<std::string, double>>{{"valid_loss", 1.0}}; });
  }

  long long checkpoint_step(const std::string& path) const {
    return std::stoll(moa::SafetensorsFile(path).metadata().at("step"));
  }
};

}  // namespace

TEST_CASE("TrainingLoop: a NaN loss stops the run, naming the step; the last good checkpoint stays", "[training][checkpoint]") {
  LoopFixture fixture("diverge_stop");
  fixture.bad_steps = {5};
  auto loop = fixture.loop();
  REQUIRE_MOA_ERROR(fixture.run(loop, 0),
                    "training diverged at step 5: the loss is nan and the gradient norm nan (lower the learning rate, "
                    "or try --on-divergence skip); the last good checkpoint, step 3, is kept in '" +
                        fixture.folder + "/checkpoint.safetensors'");
  REQUIRE(fixture.checkpoint_step(fixture.folder + "/checkpoint.safetensors") == 3);
  REQUIRE(fixture.adam.steps() == 4);  // the bad step took no optimizer step
  REQUIRE(fixture.parameters[0].value().allFinite());
}

TEST_CASE("TrainingLoop: --on-divergence skip skips the step, halves the learning rate, and resumes with it",
          "[training][checkpoint]") {
  LoopFixture fixture("diverge_skip");
  fixture.settings.on_divergence = moa_examples::OnDivergence::skip;
  fixture.bad_steps = {2};
  auto loop = fixture.loop();
  fixture.run(loop, 0);
  REQUIRE(fixture.adam.steps() == 7);  // 8 steps, one skipped
  REQUIRE(moa::SafetensorsFile(fixture.folder + "/checkpoint.safetensors").metadata().at("lr_scale") == "0.5");
  // Too many in a row: the run stops.
  LoopFixture again("diverge_skip_many");
  again.settings.on_divergence = moa_examples::OnDivergence::skip;
  again.settings.max_consecutive_skips = 2;
  again.bad_steps = {4, 5, 6};
  auto second = again.loop();
  REQUIRE_MOA_ERROR(again.run(second, 0), "training diverged at step 6");
}

TEST_CASE("save_checkpoint: refuses values that are not finite, keeps the previous file, verifies before replacing",
          "[training][checkpoint]") {
  LoopFixture fixture("save_refuses");
  const std::string path = fixture.folder + "/checkpoint.safetensors";
  moa::CheckpointWriting keep;
  keep.keep_previous = true;
  moa::save_checkpoint(path, fixture.parameters, fixture.adam, {{"step", "1"}}, keep);
  moa::save_checkpoint(path, fixture.parameters, fixture.adam, {{"step", "2"}}, keep);
  REQUIRE(fixture.checkpoint_step(path) == 2);
  REQUIRE(fixture.checkpoint_step(moa::previous_checkpoint(path)) == 1);
  fixture.layer.weight.value(1, 2) = std::numeric_limits<float>::infinity();
  REQUIRE_MOA_ERROR(moa::save_checkpoint(path, fixture.parameters, fixture.adam, {{"step", "3"}}, keep),
                    "holds a non-finite value (inf at element 5): '" + path + "' was not written");
  REQUIRE(fixture.checkpoint_step(path) == 2);
  REQUIRE(fixture.checkpoint_step(moa::previous_checkpoint(path)) == 1);
  REQUIRE_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST_CASE("average_parameters: the mean of several files, in double; bad files change nothing", "[training][checkpoint]") {
  LoopFixture fixture("average");
  const std::string first = fixture.folder + "/first.safetensors", second = fixture.folder + "/second.safetensors";
  fixture.layer.weight.value.setConstant(1.0f);
  fixture.layer.bias.value.setConstant(-2.0f);
  moa::save_checkpoint(first, fixture.parameters, fixture.adam, {{"step", "1"}});  // optimizer tensors ignored
  fixture.layer.weight.value.setConstant(2.0f);
  fixture.layer.weight.value(1, 2) = 5.0f;
  fixture.layer.bias.value.setConstant(0.5f);
  moa::save_safetensors(second, fixture.parameters);
  fixture.layer.weight.value.setZero();
  moa::average_parameters({first, second}, fixture.parameters);
  REQUIRE(fixture.layer.weight.value(0, 0) == 1.5f);
  REQUIRE(fixture.layer.weight.value(1, 2) == 3.0f);
  REQUIRE(fixture.layer.bias.value(0) == -0.75f);
  moa::average_parameters({second}, fixture.parameters);
  REQUIRE(fixture.layer.bias.value(1) == 0.5f);

  // Another model's file, a missing file, no file: errors, and the parameters stay as they were.
  moa::Rng init(3);
  moa::Linear<float> other(3, 4, true, init);
  const std::string wrong = fixture.folder + "/other.safetensors";
  moa::save_safetensors(wrong, moa::pack_parameters(other));
  REQUIRE_MOA_ERROR(moa::average_parameters({first, wrong}, fixture.parameters), "but the parameter has shape");
  REQUIRE_MOA_ERROR(moa::average_parameters({first, fixture.folder + "/none.safetensors"}, fixture.parameters),
                    "none.safetensors");
  REQUIRE_MOA_ERROR(moa::average_parameters({}, fixture.parameters), "no file to average");
  REQUIRE(fixture.layer.bias.value(1) == 0.5f);
  REQUIRE(fixture.layer.weight.value(1, 2) == 5.0f);
}

TEST_CASE("TrainingLoop: keeps the last N checkpoints' parameters for averaging; a resume or a new run prunes them",
          "[training][checkpoint]") {
  LoopFixture fixture("snapshots");
  fixture.settings.steps = 10;
  fixture.settings.checkpoint_every = 2;
  fixture.settings.keep_snapshots = 3;
  auto loop = fixture.loop();
  REQUIRE(loop.restore() == 0);
  fixture.run(loop, 0);
  auto steps_of = [](const std::vector<std::pair<long long, std::string>>& snapshots) {
    std::vector<long long> steps;
    for (const auto& snapshot : snapshots) steps.push_back(snapshot.first);
    return steps;
  };
  REQUIRE(steps_of(loop.snapshots()) == std::vector<long long>{6, 8, 10});
  // The newest snapshot holds the final parameters.
  MatrixF final_weight = fixture.layer.weight.value;
  moa::average_parameters({loop.snapshots().back().second}, fixture.parameters);
  REQUIRE(fixture.layer.weight.value == final_weight);

  // A resume from step 8 (its checkpoint kept as the previous one) drops step 10's snapshot.
  std::filesystem::remove(loop.checkpoint_path());
  fixture.settings.resume = true;
  auto resumed = fixture.loop();
  REQUIRE(resumed.restore() == 8);
  REQUIRE(steps_of(resumed.snapshots()) == std::vector<long long>{6, 8});
  fixture.run(resumed, 8);
  REQUIRE(steps_of(resumed.snapshots()) == std::vector<long long>{6, 8, 10});
  // A fresh run in the same folder starts without them.
  fixture.settings.resume = false;
  REQUIRE(fixture.loop().restore() == 0);
  REQUIRE(resumed.snapshots().empty());
}

TEST_CASE("TrainingLoop: resume falls back to the previous checkpoint only when the current one is missing",
          "[training][checkpoint]") {
  LoopFixture fixture("resume_previous");
  auto loop = fixture.loop();
  fixture.run(loop, 0);  // checkpoints at 3, 6 and 8
  const std::string path = fixture.folder + "/checkpoint.safetensors";
  REQUIRE(fixture.checkpoint_step(moa::previous_checkpoint(path)) == 6);
  fixture.settings.resume = true;
  // A corrupted current checkpoint: an error that names the previous one, nothing silent.
  std::string bytes;
  {
    std::ifstream file(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }
  bytes[bytes.size() - 2] = static_cast<char>(bytes[bytes.size() - 2] ^ 0x10);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  moa::Adam<float> fresh(fixture.parameters);
  moa::Rng fresh_rng(0);
  moa_examples::TrainingLoop<float> corrupted(fixture.settings, fixture.parameters, fresh,
                                              [](long long) { return 0.01; }, fresh_rng);
  REQUIRE_MOA_ERROR(corrupted.restore(), "fails its checksum (stored");
  REQUIRE_MOA_ERROR(corrupted.restore(), "rename it to '" + path + "' to resume from there");
  // Killed between the two renames: only the previous file is there, and the run resumes from it.
  std::filesystem::remove(path);
  moa_examples::TrainingLoop<float> resumed(fixture.settings, fixture.parameters, fresh, [](long long) { return 0.01; },
                                            fresh_rng);
  REQUIRE(resumed.restore() == 6);
  REQUIRE(fresh.steps() == 6);
}

TEST_CASE("load_checkpoint: a bad optimizer.steps or a NaN moment is refused by name", "[training][checkpoint]") {
  LoopFixture fixture("bad_optimizer");
  const std::string path = fixture.folder + "/checkpoint.safetensors";
  moa::save_checkpoint(path, fixture.parameters, fixture.adam, {{"step", "0"}});
  // Rewrite the metadata by hand: a file PyTorch could have written (no checksums).
  const moa::SafetensorsFile file(path);
  std::vector<std::vector<float>> storage;
  std::vector<moa::TensorRef<float>> tensors;
  for (const auto& [name, info] : file.tensors()) {
    std::size_t count = 1;
    for (Index extent : info.shape) count *= static_cast<std::size_t>(extent);
    storage.emplace_back(count);
    file.read(name, storage.back().data(), count);
  }
  auto rewrite = [&](const std::string& steps, bool nan_moment) {
    tensors.clear();
    std::size_t i = 0;
    for (const auto& [name, info] : file.tensors()) {
      if (nan_moment && name.rfind("optimizer.exp_avg_sq.", 0) == 0) storage[i][0] = std::nanf("");
      tensors.push_back({name, info.shape, storage[i++].data()});
    }
    moa::write_safetensors(path, tensors, moa::DType::F32, {{"optimizer.steps", steps}});
  };
  moa::Adam<float> adam(fixture.parameters);
  rewrite("abc", false);
  REQUIRE_MOA_ERROR(moa::load_checkpoint(path, fixture.parameters, adam), "metadata 'optimizer.steps' = 'abc' is not a whole number");
  rewrite("-1", false);
  REQUIRE_MOA_ERROR(moa::load_checkpoint(path, fixture.parameters, adam), "'optimizer.steps' = -1 is outside");
  rewrite("0", true);
  REQUIRE_MOA_ERROR(moa::load_checkpoint(path, fixture.parameters, adam), "holds a non-finite value (nan at element 0)");
}
