cmake_minimum_required(VERSION 3.19)
# Data-parallel training under mpirun must be the training of one process on the combined batch:
# the same train loss at every step and the same parameters and optimizer state at the end (to
# float rounding: the ranks sum their shares' gradients in another order). Also across a resume:
# a run checkpointed by 2 ranks and resumed by 1, and one checkpointed by 1 and resumed by 2, end
# where the single process ends. RUN is the run's subfolder (e.g. mha_2H16D).
string(REPLACE "|" ";" arguments "${ARGS}")
file(REMOVE_RECURSE ${WORK_DIR})
math(EXPR half "${STEPS} / 2")
function(train ranks steps folder)
  if(ranks EQUAL 1)
    set(launcher)
  else()
    set(launcher ${MPIRUN} --oversubscribe -np ${ranks})
  endif()
  execute_process(COMMAND ${launcher} ${PROGRAM} ${arguments} --steps ${steps} --output ${WORK_DIR}/${folder} ${ARGN}
                  RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE errors)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${ranks} rank(s), ${steps} steps, ${folder} ${ARGN}: failed (${status}):\n${output}${errors}")
  endif()
  message("${ranks} rank(s), ${steps} steps ${ARGN} -> ${folder}")
endfunction()
function(compare folder)
  execute_process(COMMAND ${COMPARE} ${WORK_DIR}/one/${RUN} ${WORK_DIR}/${folder}/${RUN} ${LOSS_TOLERANCE}
                          ${PARAMETER_TOLERANCE}
                  RESULT_VARIABLE status OUTPUT_VARIABLE output ERROR_VARIABLE errors)
  message("one process against ${folder}:\n${output}${errors}")
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${folder} differs from one process")
  endif()
endfunction()

train(1 ${STEPS} one)
train(2 ${STEPS} two)
compare(two)
train(3 ${STEPS} three)  # shares of unequal size
compare(three)
train(2 ${half} two_then_one)
train(1 ${STEPS} two_then_one --resume)
compare(two_then_one)
train(1 ${half} one_then_two)
train(2 ${STEPS} one_then_two --resume)
compare(one_then_two)
# With dropout each rank draws its own masks, from the run's seed and its rank: two runs with the
# same number of ranks are bit-identical.
train(2 ${STEPS} dropout_a --dropout 0.1)
train(2 ${STEPS} dropout_b --dropout 0.1)
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${WORK_DIR}/dropout_a/${RUN}/checkpoint.safetensors
                        ${WORK_DIR}/dropout_b/${RUN}/checkpoint.safetensors RESULT_VARIABLE different)
if(different)
  message(FATAL_ERROR "two runs of 2 ranks with dropout ended with different parameters")
endif()
message("2 ranks with dropout, twice: identical checkpoints")
