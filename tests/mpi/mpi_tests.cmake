# Registered MPI tests (see longtune_add_mpi_test in CMakeLists.txt). Each area adds its lines.
longtune_add_mpi_test(NAME mpi.comm.np1 NP 1 FILTER CommMpi.*)
longtune_add_mpi_test(NAME mpi.comm.np2 NP 2 FILTER CommMpi.*)
longtune_add_mpi_test(NAME mpi.node_memory.np3 NP 3 FILTER NodeMemoryMpi.*)
longtune_add_mpi_test(NAME mpi.comm.np3 NP 3 FILTER CommMpi.*)
longtune_add_mpi_test(NAME mpi.comm.np4 NP 4 FILTER CommMpi.*)
foreach(np 1 2 3 4)
  longtune_add_mpi_test(NAME mpi.sharded_training.np${np} NP ${np} FILTER ShardedTraining.* TIMEOUT 900)
endforeach()
# Crash tests (tests/crash/crash_test.py, docs/testing.md): SIGKILL a multi-rank `longtune train` at
# random moments and during checkpoint writes, restart it each time, end bit-identical.
# No launch may die on its own: every launch gets fresh Open MPI session and shared-memory
# directories (a SIGKILLed job's vader segments once made about 1 launch in 20-40 lose a rank at
# start-up when a later job drew the same job id; 0 in 146 launches since, docs/testing.md).
find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND)
  foreach(cfg "2;20;240" "3;12;150")
    list(GET cfg 0 np)
    list(GET cfg 1 trials)
    list(GET cfg 2 budget)
    add_test(NAME crash.sigkill_np${np}
             COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/../crash/crash_test.py --longtune $<TARGET_FILE:longtune>
                     --ranks ${np} --trials ${trials} --seed ${np} --budget ${budget} --mpirun ${MPIEXEC_EXECUTABLE}
                     --tolerate-unplanned 0)
    math(EXPR timeout "${budget} + 60")
    set_tests_properties(crash.sigkill_np${np} PROPERTIES TIMEOUT ${timeout} PROCESSORS 2 RUN_SERIAL TRUE
      ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1;OMP_WAIT_POLICY=PASSIVE;OMPI_MCA_rmaps_base_oversubscribe=1")
  endforeach()
  # Stop on SIGUSR1/SIGTERM (tests/crash/signal_test.py, docs/slurm.md): one rank or mpirun signalled,
  # exit 75 with a checkpoint of the same step on every rank, resume byte-identical; a second signal
  # exits 76 at once and leaves the saved checkpoints usable.
  add_test(NAME crash.signal_np2
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/../crash/signal_test.py --longtune $<TARGET_FILE:longtune>
                   --ranks 2 --mpirun ${MPIEXEC_EXECUTABLE})
  set_tests_properties(crash.signal_np2 PROPERTIES TIMEOUT 180 PROCESSORS 2 RUN_SERIAL TRUE
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1;OMP_WAIT_POLICY=PASSIVE;OMPI_MCA_rmaps_base_oversubscribe=1")
  # Slurm preemption (tests/slurm/preempt_requeue.py, docs/slurm.md): a one-machine cluster
  # (slurm/local-cluster), jobs/cpu-smoke.slurm signalled, checkpointed, requeued, resumed,
  # byte-identical. Skipped (77) when Slurm/munge are missing or the cluster cannot start.
  add_test(NAME slurm.preempt_requeue
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/slurm/preempt_requeue.py --longtune $<TARGET_FILE:longtune>
                   --repo ${PROJECT_SOURCE_DIR} --workdir ${CMAKE_CURRENT_BINARY_DIR}/slurm-preempt --mpirun ${MPIEXEC_EXECUTABLE})
  set_tests_properties(slurm.preempt_requeue PROPERTIES TIMEOUT 200 PROCESSORS 2 RUN_SERIAL TRUE SKIP_RETURN_CODE 77
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1;OMP_WAIT_POLICY=PASSIVE;OMPI_MCA_rmaps_base_oversubscribe=1")
endif()
# DeviceComm (NCCL) on one GPU per rank: skipped on every rank (reported as skipped) without GPUs.
if(LONGTUNE_HAVE_CUDA)
  foreach(np 1 2)
    longtune_add_mpi_test(NAME mpi.device_comm.np${np} NP ${np} FILTER DeviceCommMpi.*)
    set_tests_properties(mpi.device_comm.np${np} PROPERTIES SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
  endforeach()
endif()
# The sharded GPU engine on one GPU per rank against one GPU on the whole batch (skipped without GPUs).
if(LONGTUNE_HAVE_CUDA)
  longtune_add_mpi_test(NAME mpi.zero_engine.np2 NP 2 FILTER ZeroEngineMpi.*)
  set_tests_properties(mpi.zero_engine.np2 PROPERTIES SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
endif()
