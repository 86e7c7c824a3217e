// moa/io.hpp - umbrella header of the checkpoint layer: safetensors files and training checkpoints
// (parameters, Adam moments, metadata). Needs nlohmann_json besides the core (target moa::io).
#pragma once

#include "moa/moa.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/io/checkpoint.hpp"
#include "moa/io/attention_spans.hpp"
