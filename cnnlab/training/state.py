"""`TrainState`: everything a training run is made of, in one object. The loop (loop.py) fills it
and hands it to every callback hook (callbacks.py); nothing else is passed around."""
from dataclasses import dataclass
from typing import Any, Callable

from .engine import eval_weights


def silent(*args, **kwargs):
    """The log of a quiet run and of DDP ranks other than 0."""


@dataclass
class TrainState:
    cfg: Any                        # the resolved TrainConfig
    ctx: Any                        # runtime.Context: device, rank, world, autocast
    run: Any = None                 # run_folder.RunFolder (writes nothing on ranks other than 0)
    resumed: bool = False
    log: Callable = silent          # console lines: print on rank 0 unless quiet
    # built by loop.build
    data: Any = None                # data.Data: uint8 splits, classes, .preprocess
    model: Any = None
    forward: Any = None             # the model as training calls it (DDP, torch.compile)
    optimizer: Any = None
    head: tuple = ()                # the classifier's parameter names (--backbone-lr-mult's groups)
    ema: Any = None                 # the AveragedModel with --ema, else None
    lookahead: Any = None           # lookahead.Lookahead with --lookahead, else None
    step: Callable = None           # engine.make_step: (images, labels, lr) -> (loss sum, correct)
    progress: Any = None            # progress.Progress: where the run is, and the current lr
    augment: str = None
    train_loader: Any = None
    val_loader: Any = None
    meta: dict = None               # checkpoint.metadata: what every checkpoint says about the run
    fine_tune: str = None           # finetune.describe: the pretrained weights, what is frozen (settings block)
    # filled while training
    best_weights: dict = None       # the best epoch's weights so far (CPU state_dict)
    row: dict = None                # the metrics.csv row of the epoch that just ended
    raw_val_acc: float = None       # with --ema: the raw last weights' validation accuracy
    test: dict = None               # engine.evaluate(collect=True) of the best weights on the test split
    final_test: dict = None         # the last epoch's weights on the test split (state.test when they are the best)
    summary: dict = None            # summary.json

    @property
    def has_val(self):
        """Whether the run has a validation split; without one no accuracy is called "val"."""
        return len(self.data.val[1]) > 0

    @property
    def run_dir(self):
        return self.run.path if self.run is not None else None

    @property
    def eval_model(self):
        """The network validated, tested and saved as best: the EMA average when --ema is on."""
        return eval_weights(self.model, self.ema)

    @property
    def history(self):
        return self.progress.history
