// Micro-benchmarks of the engine's host-side parts (`longtune bench <what>`). Each returns the
// process exit code; errors are thrown as longtune::Error and turned into a message by main().
#pragma once

namespace longtune::cli {

// longtune bench adamw: host AdamW step time (params/s, GB/s) against a STREAM-like copy/triad
// measured in the same run with the same threads, for each thread count of --threads.
// argv[0] is the subcommand name ("adamw"), options follow (see --help).
int run_bench_adamw(int argc, char** argv);

// longtune bench checkpoint: HDF5 checkpoint write/read GB/s of a synthetic --gib GiB optimizer
// state (io/checkpoint.hpp) against raw sequential write()/read() of the same disk in the same run,
// with the page cache dropped before every read. argv[0] is "checkpoint", options follow.
int run_bench_checkpoint(int argc, char** argv);

// longtune bench train (CUDA builds): single-GPU training-step throughput, MFU and peak memory on
// a Llama shape with random weights, the experiment of bench/anchor_torch.py. src/gpu/bench_train.cpp.
int run_bench_train(int argc, char** argv);

// longtune bench comm (CUDA builds): the DeviceComm collectives (NCCL across ranks, one GPU per
// rank) checked against the host MPI Comm, then timed with nccl-tests' algbw / busbw. Run under
// mpirun -np N. src/gpu/bench_comm.cpp.
int run_bench_comm(int argc, char** argv);

// longtune plan (CUDA builds; needs no GPU): predicted device and host memory per rank for every
// placement of weights, optimizer and activations, and the longest trainable sequence.
// src/gpu/plan.cpp.
int run_plan(int argc, char** argv);

}  // namespace longtune::cli
