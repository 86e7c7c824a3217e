// The smallest moa program: a two-layer classifier trained with Adam on a synthetic task, saved
// and loaded through safetensors.
//     quickstart [checkpoint.safetensors]
#include "moa/moa.hpp"
#include "moa/io/safetensors.hpp"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  using Matrix = moa::Matrix<float>;
  const std::string checkpoint = argc > 1 ? argv[1] : "quickstart.safetensors";
  const moa::Index batch = 64, features = 16, classes = 4;

  moa::Rng rng(2026);
  moa::LayerNorm<float> norm(features);
  moa::FeedForward<float> ffn(features, 64, moa::Activation::gelu, rng);
  moa::Linear<float> head(features, classes, true, rng);
  moa::ParameterList<float> parameters;
  norm.collect_parameters(parameters, "norm.");
  ffn.collect_parameters(parameters, "ffn.");
  head.collect_parameters(parameters, "head.");
  moa::Adam<float> adam(parameters);
  moa::CrossEntropyLoss<float> loss_function(0.0);

  // The task: the class is the index of the largest of the first `classes` features.
  auto make_batch = [&](Matrix& inputs, moa::TokenIds& labels) {
    inputs.resize(batch, features);
    moa::init_normal(inputs, rng, 0.0, 1.0);
    labels.resize(batch);
    for (moa::Index i = 0; i < batch; ++i) inputs.row(i).head(classes).maxCoeff(&labels[i]);
  };
  auto forward = [&](const Matrix& inputs) {
    Matrix hidden = norm.forward(inputs);
    hidden += ffn.forward(hidden);  // residual
    return head.forward(hidden);
  };

  Matrix inputs;
  moa::TokenIds labels;
  float loss = 0;
  for (int step = 1; step <= 300; ++step) {
    make_batch(inputs, labels);
    loss = loss_function.forward(forward(inputs), labels);
    parameters.zero_grad();
    Matrix grad_hidden = head.backward(loss_function.backward());
    grad_hidden += ffn.backward(grad_hidden);
    norm.backward(grad_hidden);
    adam.step(3e-3);
    if (step % 50 == 0) std::printf("step %3d  loss %.4f\n", step, loss);
  }

  make_batch(inputs, labels);
  const Matrix logits = forward(inputs);
  moa::save_safetensors(checkpoint, parameters);
  parameters.zero_grad();
  for (const auto& entry : parameters) entry.value().setZero();
  moa::load_safetensors(checkpoint, parameters);
  const bool same = forward(inputs) == logits;
  int correct = 0;
  for (moa::Index i = 0; i < batch; ++i) {
    moa::Index predicted = 0;
    logits.row(i).maxCoeff(&predicted);
    correct += predicted == labels[i];
  }
  std::printf("parameters %lld, accuracy %d/%lld, checkpoint %s reloads %s\n",
              static_cast<long long>(parameters.numel()), correct, static_cast<long long>(batch), checkpoint.c_str(),
              same ? "identically" : "DIFFERENTLY");
  return same && loss < 0.5f ? 0 : 1;
}
