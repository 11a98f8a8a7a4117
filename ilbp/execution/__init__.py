"""How a train step runs: the executors and what they share.

  base.py       the `Executor` protocol the trainer talks to, `ExecutionConfig` (config.execution,
                checked once)
  factory.py    `make`: the executor an ExecutionConfig asks for; `input_shard`
  stage.py      the per-stage layer every executor runs: F, H, B, U and eval of one stage,
                bound once in a `Stage`; what a microbatch means
  fused.py      one program for the whole network, data parallel (the exactness reference)
  schedule.py   a pipeline's ops as types, their dependencies and order, the cost model
  dataflow.py   one program per stage and op, stage k on its own devices, one host
  spmd/         one program over a ('stage', 'data') mesh: a scan over the schedule's ticks

Each executor imports only the layers below it (base, stage, schedule); only the factory
imports every executor.
"""
