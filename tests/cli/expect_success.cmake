cmake_minimum_required(VERSION 3.19)
# Runs PROGRAM with ARGS ('|'-separated) and passes when it exits with status 0 and its output
# matches EXPECT.
string(REPLACE "|" ";" arguments "${ARGS}")
execute_process(COMMAND ${PROGRAM} ${arguments} RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE errors)
message("exit status: ${status}\n${output}${errors}")
if(NOT status EQUAL 0)
  message(FATAL_ERROR "the program failed")
endif()
if(NOT "${output}${errors}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "the output does not match '${EXPECT}'")
endif()
