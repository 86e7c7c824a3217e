// examples/common/distributed.hpp - data-parallel training across processes with MPI (Open MPI
// from Debian): the trainers run unchanged under `mpirun -np N`. Every rank builds the same model,
// trains on its share of each step's batch, and one all-reduce of the gradient block makes every
// rank's optimizer step the same (see TrainingLoop). Without mpirun, or in a build without MPI,
// a program is one process and nothing here communicates.
//
// A failure on one rank stops the job: run_ranked() prints the error with the rank's number and
// calls MPI_Abort, which ends every rank (none is left waiting in a collective).
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#ifdef MOA_EXAMPLES_HAVE_MPI
#include <mpi.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>

namespace moa_examples {

using moa::Index;

// The world the program trains in: this process's rank among `size` processes. A default one is a
// single process.
class Distributed {
 public:
  Distributed() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }
  bool is_parallel() const { return size_ > 1; }
  // "rank 1 of 2: " before a message, or nothing for a single process.
  std::string label() const {
    return is_parallel() ? "rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ": " : "";
  }

  // Sums over the ranks, in place; every rank gets the same numbers.
  void sum(float* data, Index count) const { reduce(data, count, kFloat, kSum); }
  void sum(double* data, Index count) const { reduce(data, count, kDouble, kSum); }

  // Rank 0's numbers, on every rank.
  void broadcast(float* data, Index count) const { share(data, count, kFloat); }
  void broadcast(std::uint64_t* data, Index count) const { share(data, count, kUnsigned); }
  void broadcast(std::string& bytes) const {
    std::uint64_t length = bytes.size();
    broadcast(&length, 1);
    bytes.resize(static_cast<std::size_t>(length));
    share(bytes.data(), static_cast<Index>(length), kByte);
  }

  // Whether every rank has the same `value` (e.g. a checksum of the parameters).
  bool same_everywhere(std::uint64_t value) const {
    if (!is_parallel()) return true;
    std::uint64_t low = value, high = value;
    reduce(&low, 1, kUnsigned, kMin);
    reduce(&high, 1, kUnsigned, kMax);
    return low == high;
  }

  // Ends every rank of the job with `code`.
  [[noreturn]] void abort(int code) const {
#ifdef MOA_EXAMPLES_HAVE_MPI
    if (is_parallel()) MPI_Abort(MPI_COMM_WORLD, code);
#endif
    std::exit(code);
  }

 private:
  friend class MpiSession;
  enum Type { kFloat, kDouble, kUnsigned, kByte };
  enum Operation { kSum, kMin, kMax };

  void reduce(void* data, Index count, Type type, Operation operation) const {
#ifdef MOA_EXAMPLES_HAVE_MPI
    const MPI_Op op = operation == kSum ? MPI_SUM : operation == kMin ? MPI_MIN : MPI_MAX;
    in_pieces(data, count, type, [&](void* piece, int piece_count) {
      check(MPI_Allreduce(MPI_IN_PLACE, piece, piece_count, mpi_type(type), op, MPI_COMM_WORLD), "MPI_Allreduce");
    });
#else
    (void)data, (void)count, (void)type, (void)operation;
#endif
  }

  void share(void* data, Index count, Type type) const {
#ifdef MOA_EXAMPLES_HAVE_MPI
    in_pieces(data, count, type, [&](void* piece, int piece_count) {
      check(MPI_Bcast(piece, piece_count, mpi_type(type), 0, MPI_COMM_WORLD), "MPI_Bcast");
    });
#else
    (void)data, (void)count, (void)type;
#endif
  }

#ifdef MOA_EXAMPLES_HAVE_MPI
  static constexpr Index kMaxCount = Index(1) << 30;
  static MPI_Datatype mpi_type(Type type) {
    switch (type) {
      case kFloat: return MPI_FLOAT;
      case kDouble: return MPI_DOUBLE;
      case kUnsigned: return MPI_UINT64_T;
      case kByte: break;
    }
    return MPI_BYTE;
  }
  // MPI counts are int: a large block goes in pieces. Nothing to do for one process.
  template <typename Call>
  void in_pieces(void* data, Index count, Type type, Call&& call) const {
    if (!is_parallel()) return;
    const Index bytes = type == kFloat ? 4 : type == kByte ? 1 : 8;
    for (Index first = 0; first < count; first += kMaxCount)
      call(static_cast<char*>(data) + first * bytes, static_cast<int>(std::min<Index>(kMaxCount, count - first)));
  }
  void check(int status, const char* call) const {
    MOA_CHECK(status == MPI_SUCCESS, "Distributed", label(), call, " failed (MPI error ", status, ")");
  }
#endif

  int rank_ = 0;
  int size_ = 1;
};

// MPI for the length of main(): initialised when the program was started by mpirun (Open MPI or
// a PMIx launcher sets the world's size in the environment), finalised at the end. Started
// otherwise, the program is one process and never touches MPI.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv, const char* program) {
    const char* launched_size = launcher_world_size();
#ifdef MOA_EXAMPLES_HAVE_MPI
    if (launched_size == nullptr) return;
    int provided = 0;
    // Only the main thread calls MPI; the compute threads never do.
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
      std::fprintf(stderr, "%s: error: MPI_Init_thread failed\n", program);
      std::exit(1);
    }
    initialised_ = true;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_.rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &world_.size_);
#else
    (void)argc, (void)argv;
    // N copies of a build without MPI would each train the whole model into one folder.
    if (launched_size != nullptr && std::atoi(launched_size) > 1) {
      std::fprintf(stderr,
                   "%s: error: started by mpirun with %s processes, but this build has no MPI (install libopenmpi-dev "
                   "and reconfigure); run it as one process\n",
                   program, launched_size);
      std::exit(1);
    }
#endif
  }
  ~MpiSession() {
#ifdef MOA_EXAMPLES_HAVE_MPI
    if (initialised_) MPI_Finalize();
#endif
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  const Distributed& world() const { return world_; }

 private:
  static const char* launcher_world_size() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"})
      if (const char* value = std::getenv(name)) return value;
    return nullptr;
  }

  Distributed world_;
#ifdef MOA_EXAMPLES_HAVE_MPI
  bool initialised_ = false;
#endif
};

// Rank 0's file at `path` (e.g. the tokenizer it trained), on every rank: written where it is
// missing or differs, so that ranks on machines without a shared folder have it too. Each writer
// renames its own temporary file into place, so ranks sharing a folder never see half a file.
inline void share_file(const Distributed& world, const std::string& path) {
  if (!world.is_parallel()) return;
  auto read = [](const std::string& name, std::string& bytes) {
    std::ifstream file(name, std::ios::binary);
    if (!file.good()) return false;
    bytes.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
    return true;
  };
  std::string bytes;
  if (world.is_root()) MOA_CHECK(read(path, bytes), "share_file", "cannot read '", path, "'");
  world.broadcast(bytes);
  if (world.is_root()) return;
  std::string present;
  if (read(path, present) && present == bytes) return;
  const std::string temporary = path + ".rank" + std::to_string(world.rank());
  {
    std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    MOA_CHECK(file.good(), "share_file", world.label(), "cannot write '", temporary, "'");
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  MOA_CHECK(!error, "share_file", world.label(), "cannot rename '", temporary, "' to '", path, "': ", error.message());
}

// ", data parallel over 2 ranks (each step's batch shared among them)" for a start-up line, or nothing.
inline std::string data_parallel_note(const Distributed& world) {
  if (!world.is_parallel()) return {};
  return ", data parallel over " + std::to_string(world.size()) + " ranks (each step's batch shared among them)";
}

// Runs a program's body; an exception is printed as "program: error: ..." (with "rank r of n: "
// first under mpirun) and ends the whole job, so that no other rank waits for this one forever.
template <typename Body>
int run_ranked(const Distributed& world, const char* program, Body&& body) {
  try {
    return body();
  } catch (const std::exception& error) {
    // An error every rank meets (a bad flag) is printed once: rank 0's abort ends the others while
    // they wait this moment; an error of one rank alone is printed after it.
    if (world.is_parallel() && !world.is_root()) std::this_thread::sleep_for(std::chrono::milliseconds(500));
    std::string message = error.what();
    const std::string prefix = std::string(program) + ": ";
    if (message.rfind(prefix, 0) == 0) message.erase(0, prefix.size());
    std::fprintf(stderr, "%s%s: error: %s\n", world.label().c_str(), program, message.c_str());
    std::fflush(stderr);
    if (world.is_parallel()) world.abort(1);
    return 1;
  }
}

}  // namespace moa_examples
