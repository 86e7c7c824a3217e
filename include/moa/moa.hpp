// moa/moa.hpp - umbrella header: the core of moa, in dependency order. Needs Eigen only.
// Optional parts with further dependencies are included on their own:
//   moa/safetensors.hpp (nlohmann_json)
//   moa/dnnl_gemm.hpp (oneDNN: the faster GEMM backend, target moa::dnnl)
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"
#include "moa/thread_pool.hpp"
#include "moa/gemm.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/softmax.hpp"
#include "moa/linear.hpp"
#include "moa/embedding.hpp"
#include "moa/layer_norm.hpp"
#include "moa/dropout.hpp"
#include "moa/feed_forward.hpp"
#include "moa/loss.hpp"
#include "moa/optimizer.hpp"
#include "moa/top_k.hpp"
#include "moa/router.hpp"
#include "moa/attention.hpp"
#include "moa/kv_cache.hpp"
#include "moa/mixture_of_attention.hpp"
#include "moa/multi_head_attention.hpp"
#include "moa/gradient_check.hpp"
