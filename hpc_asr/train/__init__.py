"""Training, one process per rank:

    mpirun -np 2 python -m hpc_asr.train --config hpc_asr/configs/demo.yaml [--train.epochs 3]

- ``loop``: set-up, resume, the step loop, evaluation and checkpoints (``train``, ``main``).
- ``state``: the training position, what ``last.pt`` holds, the config comparison on resume.
- ``preempt``: SIGUSR1/SIGTERM → checkpoint → exit status 3, and the test hooks.
- ``metrics``: metrics.jsonl, TensorBoard and the rank-0 progress line.
"""

from hpc_asr.train.loop import (
    EXIT_PREEMPTED,
    Preempted,
    autocast_dtype,
    flops_per_audio_second,
    lr_lambda,
    lr_scale,
    main,
    train,
)

__all__ = ["EXIT_PREEMPTED", "Preempted", "autocast_dtype", "flops_per_audio_second", "lr_lambda", "lr_scale",
           "main", "train"]
