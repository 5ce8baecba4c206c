"""Training, one process per rank:

    mpirun -np 2 python -m hpc_asr train --config hpc_asr/configs/demo.yaml [--train.epochs 3]

- ``loop``: the step loop, evaluation and checkpoints (``train``, ``main``).
- ``setup``: engine, data checks, tokenizer, model, optimizer; the resume from ``last.pt``.
- ``schedule``: warmup + cosine LR in schedule steps, the peak scaled to the global batch.
- ``state``: the training position, what ``last.pt`` holds, the config comparison on resume.
- ``preempt``: SIGUSR1/SIGTERM → checkpoint → exit status 3, and the test hooks.
- ``log``: metrics.jsonl, TensorBoard and the rank-0 progress line.
- ``lock``: one run per ``train.out_dir`` (``train.lock`` names its holder; stale ones are taken over).

Nothing is imported here, so ``hpc_asr.train.preempt`` stays light (the job renderer reads its
exit status without importing torch).
"""
