cmake_minimum_required(VERSION 3.19)
# The test suite's short fuzzing run: builds the fuzz targets with clang in a folder of their own
# and fuzzes each for SECONDS seconds. Any finding fails the test, with libFuzzer's report.
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR} -DCMAKE_BUILD_TYPE=Debug
                        -DCMAKE_CXX_COMPILER=${CLANGXX} -DMOA_BUILD_FUZZERS=ON -DMOA_BUILD_TESTS=OFF
                        -DMOA_BUILD_EXAMPLES=OFF -DMOA_BUILD_BENCHMARKS=OFF -DMOA_INSTALL=OFF
                        -DMOA_FUZZ_SECONDS=${SECONDS}
                RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "configuring the fuzz targets failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR} -j 2 RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "building the fuzz targets failed")
endif()
execute_process(COMMAND ${CMAKE_CTEST_COMMAND} --test-dir ${WORK_DIR} -L fuzz -j 2 --output-on-failure RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "a fuzz target found a failing input (see its report above)")
endif()
