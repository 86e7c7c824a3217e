// moa/models.hpp - umbrella header of the models layer: Transformer layers, the shared encoder,
// Seq2Seq (translation), MaskedLM, and greedy and beam-search decoding. Needs the core only.
#pragma once

#include "moa/moa.hpp"
#include "moa/models/attention_spec.hpp"
#include "moa/models/attention_site.hpp"
#include "moa/models/transformer_config.hpp"
#include "moa/models/encoder_layer.hpp"
#include "moa/models/decoder_layer.hpp"
#include "moa/models/transformer_encoder.hpp"
#include "moa/models/seq2seq.hpp"
#include "moa/models/masked_lm.hpp"
#include "moa/models/decoding.hpp"
