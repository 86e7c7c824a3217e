cmake_minimum_required(VERSION 3.19)
# The README's demo: runs the translate trainer (PROGRAM, ARGS '|'-separated, output in OUTPUT),
# then reads OUTPUT/results.json and says whether the numbers are in the ranges measured for this
# configuration, so a newcomer can tell a good run from a broken one. Fails when they are not.
string(REPLACE "|" ";" arguments "${ARGS}")
# Every demo starts from nothing: a tokenizer left by an older build was trained on what that
# build read from the corpora, and would shift every number.
file(REMOVE_RECURSE ${OUTPUT})
string(TIMESTAMP started "%s")
execute_process(COMMAND ${PROGRAM} ${arguments} --output ${OUTPUT} RESULT_VARIABLE status)
string(TIMESTAMP finished "%s")
if(NOT status EQUAL 0)
  message(FATAL_ERROR "the demo's trainer failed (exit status ${status})")
endif()
math(EXPR seconds "${finished} - ${started}")
math(EXPR minutes "${seconds} / 60")
math(EXPR rest "${seconds} % 60")
file(READ ${OUTPUT}/results.json results)

# Expected ranges: measured for this configuration (see the README), wide enough for another CPU's
# rounding. Each: key, low, high, what it means.
set(ranges
    "valid_loss|2.5|3.1|validation NLL in nats per token (lower is better)"
    "bleu|9|16|test BLEU, beam 4, on all test sentences"
    "bleu_by_corpus.libreoffice.bleu|14|25|test BLEU on the LibreOffice help sentences"
    "bleu_by_corpus.ding.bleu|0.5|5|test BLEU on Ding's everyday sentences (hard for a model this small)")
set(failed "")
string(JSON runs LENGTH "${results}" runs)
math(EXPR last "${runs} - 1")
message("\n== Demo finished in ${minutes} min ${rest} s. Expected ranges for this configuration, and this run:")
foreach(index RANGE ${last})
  string(JSON model GET "${results}" runs ${index} model)
  foreach(range ${ranges})
    string(REPLACE "|" ";" fields "${range}")
    list(GET fields 0 key)
    list(GET fields 1 low)
    list(GET fields 2 high)
    list(GET fields 3 meaning)
    string(REPLACE "." ";" path "${key}")
    string(JSON value ERROR_VARIABLE missing GET "${results}" runs ${index} ${path})
    if(missing)
      set(verdict "MISSING")
      list(APPEND failed "${model} ${key}")
    elseif(value LESS low OR value GREATER high)
      set(verdict "OUT OF RANGE")
      list(APPEND failed "${model} ${key}")
    else()
      set(verdict "ok")
    endif()
    # Two decimals, rounded (CMake's math is integer only).
    string(REGEX MATCH "^([0-9]+)\\.?([0-9]*)" _ "${value}")
    string(SUBSTRING "${CMAKE_MATCH_2}000" 0 3 thousandths)
    math(EXPR hundredths "(${CMAKE_MATCH_1} * 1000 + 1${thousandths} - 1000 + 5) / 10")
    math(EXPR whole "${hundredths} / 100")
    math(EXPR fraction "${hundredths} % 100")
    if(fraction LESS 10)
      set(fraction "0${fraction}")
    endif()
    set(shown "${whole}.${fraction}")
    message("  ${model} ${meaning}: ${shown} (expected ${low} to ${high}) ${verdict}")
  endforeach()
endforeach()
if(failed)
  message(FATAL_ERROR "outside the expected ranges: ${failed}. On another CPU the numbers move a little; far "
                      "outside means something is wrong (data missing, a changed flag, a bug).")
endif()
message("All in range: the run is as expected. Outputs: ${OUTPUT}/ (loss.svg, results.json, */test.hyp, */experts.txt)")
