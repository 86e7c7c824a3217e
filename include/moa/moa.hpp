// moa/moa.hpp - umbrella header of the core, in dependency order. Needs Eigen only (target moa::moa).
//
// The other layers have their own umbrella headers and targets:
//   moa/models.hpp   Transformer layers, Seq2Seq, MaskedLM, decoding     (moa::models, core only)
//   moa/text.hpp     special ids, batching, BLEU and chrF                 (moa::text, core only)
//   moa/io.hpp       safetensors files and checkpoints                    (moa::io, nlohmann_json)
// and optional parts are included on their own:
//   moa/text/tokenizer.hpp        SentencePiece tokenizer                 (moa::tokenizer)
//   moa/backends/dnnl_gemm.hpp    oneDNN, the faster GEMM backend         (moa::dnnl)
//   moa/testing/gradient_check.hpp  finite-difference gradient checks, for tests
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"
#include "moa/bfloat16_number.hpp"
#include "moa/thread_pool.hpp"
#include "moa/reusable.hpp"
#include "moa/gemm.hpp"
#include "moa/bfloat16.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/init.hpp"
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
#include "moa/sequence_batch.hpp"
#include "moa/attention_span.hpp"
#include "moa/attention_kernel.hpp"
#include "moa/kv_cache.hpp"
#include "moa/expert_projections.hpp"
#include "moa/mixture_of_attention.hpp"
#include "moa/mixture_of_heads.hpp"
#include "moa/multi_head_attention.hpp"
