"""The training stage: the loop (loop.py) and its state, callbacks and progress, the engine's step
and evaluation pass, optimizers and schedules, checkpoints, the run folder, DDP, lr-find.
The public entry point is `cnnlab.train()` (api.py), which calls `loop.fit`."""
