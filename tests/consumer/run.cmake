# Builds and runs tests/consumer against moa. MODE=install: install the configured build tree
# MOA_BINARY_DIR into a prefix and use find_package; MODE=subdirectory: add_subdirectory(MOA_SOURCE_DIR).
cmake_minimum_required(VERSION 3.19)
file(REMOVE_RECURSE ${WORK_DIR})
set(consumer_args)
if(MODE STREQUAL "install")
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${MOA_BINARY_DIR} --prefix ${WORK_DIR}/prefix
                  COMMAND_ERROR_IS_FATAL ANY)
  set(consumer_args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
elseif(MODE STREQUAL "subdirectory")
  set(consumer_args -DMOA_SOURCE_DIR=${MOA_SOURCE_DIR})
else()
  message(FATAL_ERROR "MODE must be install or subdirectory, got '${MODE}'")
endif()
# No build type, so no optimization: what is tested is the packaging, and unoptimized the consumer
# compiles in about 60% of the time.
execute_process(COMMAND ${CMAKE_COMMAND} -S ${MOA_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/build
                        ${consumer_args} COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${WORK_DIR}/build/consumer WORKING_DIRECTORY ${WORK_DIR} COMMAND_ERROR_IS_FATAL ANY)
