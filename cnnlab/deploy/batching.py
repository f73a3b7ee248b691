"""Concurrent requests classified together: the images of requests that queued while the model
was busy go through one forward pass (PyTorch classifies ~3x more images a second at batch 256
than at batch 1 on this CPU; ONNX Runtime's batch 1 is already near its batch-256 rate:
benchmarks/README.md)."""
import asyncio

import torch

# Seconds the first image waits for company (serve --batch-wait-ms). 0 by default: measured with
# serve_load.py on this 2-core machine, a 2 ms window cost 7-19% of the throughput (HTTP and decoding,
# not the forward pass, bound it here), while batching what is already queued costs nothing.
WAIT = 0.0


class Batcher:
    """`await probabilities(x)` for a (n, C, S, S) uint8 batch of one request: one worker task takes
    what is queued, waits up to `wait` seconds for more while under `max_batch` images, runs one
    forward pass (in a thread, off the event loop) and hands each request its rows. `max_batch` 1
    runs each request alone. `on_batch(n)` is told each batch's size (for /metrics)."""

    def __init__(self, model, max_batch=32, wait=WAIT, on_batch=None):
        self.model, self.max_batch, self.wait, self.on_batch = model, max_batch, wait, on_batch
        self.loop = self.queue = None

    async def probabilities(self, x):
        self.start()
        done = self.loop.create_future()
        await self.queue.put((x, done))
        return await done

    def start(self):
        """The queue and its worker, made in the running event loop (a test client may run several)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self.queue = loop, asyncio.Queue()
            self.worker = loop.create_task(self.run())   # kept referenced: asyncio holds tasks weakly

    async def gather(self):
        """The next batch: at least one waiting request, then more until max_batch images or the wait ends."""
        items = [await self.queue.get()]
        deadline = self.loop.time() + self.wait
        while sum(len(x) for x, _ in items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            left = deadline - self.loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return items

    async def run(self):
        from starlette.concurrency import run_in_threadpool

        while True:
            items = await self.gather()
            batch = torch.cat([x for x, _ in items])
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                probs = await run_in_threadpool(self.model.probabilities, batch)
                answers = probs.split([len(x) for x, _ in items])
            except Exception as e:   # each waiting request gets the error; the worker goes on
                answers = [e] * len(items)
            for answer, (_, done) in zip(answers, items):
                if done.cancelled():   # its client went away
                    continue
                done.set_exception(answer) if isinstance(answer, Exception) else done.set_result(answer)
