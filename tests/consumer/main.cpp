#include <moa/moa.hpp>
#include <moa/safetensors.hpp>

#include <cstdio>

int main() {
  moa::Rng rng(42);
  moa::Linear<float> layer(8, 4, true, rng);
  moa::Matrix<float> x(3, 8);
  moa::init_normal(x, rng, 0.0, 1.0);
  const moa::Matrix<float> y = layer.forward(x);
  layer.backward(moa::Matrix<float>::Ones(3, 4));
  moa::save_safetensors("consumer.safetensors", moa::parameters_of(layer, "layer."));
  moa::Linear<float> copy(8, 4, true, rng);
  moa::load_safetensors("consumer.safetensors", moa::parameters_of(copy, "layer."));
  const bool ok = copy.forward(x) == y;
  std::printf("consumer: output [%lld, %lld], reload %s\n", static_cast<long long>(y.rows()),
              static_cast<long long>(y.cols()), ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
