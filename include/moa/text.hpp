// moa/text.hpp - umbrella header of the text layer: special ids, token batching, BLEU and chrF.
// Needs the core only. The SentencePiece tokenizer (moa/text/tokenizer.hpp, target moa::tokenizer)
// is included on its own, since it needs libsentencepiece.
#pragma once

#include "moa/moa.hpp"
#include "moa/text/special_ids.hpp"
#include "moa/text/batching.hpp"
#include "moa/text/metrics.hpp"
