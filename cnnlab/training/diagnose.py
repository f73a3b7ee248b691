"""Plain-language diagnostics of a finished run, for summary.json and the report, and the one a
run needs at once: a diverging loss, said on stderr the epoch it happens (`DivergenceWarning`)."""
import math

from ..errors import note
from .callbacks import Callback

# A training loss this many times a uniform guess's, ln(K) (where an untrained network starts), or
# rising this many times above its lowest epoch, is a diverged run: --lr 1e6 with Adam ended with
# loss 7e29 and exit 0, its weights useless, and nothing said so.
DIVERGED = 10


def divergence(history, num_classes):
    """The diagnostic of a diverged training loss, or None: the worst epoch, compared with ln(K)."""
    if not history:
        return None
    guess = math.log(max(2, num_classes))
    lowest, worst = math.inf, None
    for row in history:
        loss = row["train_loss"]
        if loss > DIVERGED * guess or (loss > guess and loss > DIVERGED * lowest):
            worst = row if worst is None or loss > worst["train_loss"] else worst
        lowest = min(lowest, loss)
    if worst is None:
        return None
    return (f"Training diverged: the training loss reached {worst['train_loss']:.3g} at epoch {worst['epoch']:.0f}, "
            f"against {guess:.2f} for a uniform guess over {num_classes} classes (lr {worst['lr']:.3g}). The weights "
            "are not useful: lower --lr (try cnnlab lr-find), or add --grad-clip 1 or a --warmup-epochs.")


class DivergenceWarning(Callback):
    """The divergence diagnostic on stderr at the end of the epoch it appears in, once, so a run
    that will not recover can be stopped; summary.json keeps it among the diagnostics."""

    def __init__(self):
        self.warned = False

    def on_epoch_end(self, state):
        text = None if self.warned else divergence(state.history, len(state.data.classes))
        if text:
            note(f"warning: {text}")
            self.warned = True


# A class with under this fraction of the median class's training images is starved when its test
# recall is also STARVED_GAP below the accuracy: the imbalance benchmark's classes cut to 5% fell
# 20-40 points (benchmarks/README.md).
STARVED_SHARE, STARVED_GAP = 0.2, 0.1


def starved(cm, classes, train_labels, cfg=None):
    """The diagnostic of minority classes that training starved, or None: each named with its
    training count and test recall, and the flags that act on it when the run used neither."""
    import torch

    counts = torch.bincount(train_labels.cpu(), minlength=len(classes))
    median = float(counts.float().median())
    support, hits = cm.sum(1), cm.diag()
    accuracy = float(hits.sum()) / max(1, int(support.sum()))
    names = [f"{classes[k]} ({int(counts[k])} training images, test recall {float(hits[k]) / int(support[k]):.0%})"
             for k in range(len(classes))
             if support[k] > 0 and counts[k] < STARVED_SHARE * median
             and float(hits[k]) / int(support[k]) < accuracy - STARVED_GAP]
    if not names:
        return None
    unused = cfg is None or (cfg.class_weights == "none" and cfg.sampler == "shuffle")
    return (f"Starved minority class{'es' if len(names) > 1 else ''}: {', '.join(names[:5])}, against a median of "
            f"{median:.0f} training images per class and {accuracy:.1%} accuracy."
            + (" Try --class-weights auto or --sampler balanced." if unused else
               " Class weights or the balanced sampler are on: more images of the class would help most."))


def diagnose(history, cm, classes, raw_val_acc=None, train_labels=None, cfg=None):
    """`raw_val_acc`: with --ema, the raw (not averaged) last weights' validation accuracy;
    `train_labels`, `cfg`: the training split's labels and the run's config, for starved classes."""
    notes = []
    if not history:
        return notes
    diverged = divergence(history, len(classes))
    if diverged:
        notes.append(diverged)
    last = history[-1]
    chance = 1 / max(1, len(classes))
    val_acc = last["val_acc"] if not math.isnan(last["val_acc"]) else None
    if val_acc is not None and last["train_acc"] - val_acc > 0.1:
        notes.append(f"Overfitting: train accuracy {last['train_acc']:.1%} is far above validation "
                     f"{val_acc:.1%}. Try augmentation, dropout, weight decay or fewer epochs.")
    best = max(row["val_acc"] if not math.isnan(row["val_acc"]) else row["train_acc"] for row in history)
    if best < chance * 1.5:
        notes.append(f"Accuracy is stuck near chance ({chance:.1%}): the model is not learning. "
                     "Check the learning rate (try cnnlab lr-find) and the labels.")
    losses = [row["val_loss"] for row in history if not math.isnan(row["val_loss"])]
    rising = 0
    for a, b in zip(losses, losses[1:]):
        rising = rising + 1 if b > a else 0
    if rising >= 3:
        notes.append(f"Validation loss rose for the last {rising} epochs: training longer is hurting; "
                     "the best checkpoint (best.pt) was kept from before.")
    ema_val_acc = last["val_acc"]
    if raw_val_acc is not None and not math.isnan(ema_val_acc) and raw_val_acc - ema_val_acc > 0.05:
        notes.append(f"The EMA weights (--ema) reach {ema_val_acc:.1%} validation accuracy, far below the raw "
                     f"weights' {raw_val_acc:.1%}: the average still remembers early weights. Use a smaller "
                     "--ema (e.g. 0.99) or train longer; best.pt and the test score use the EMA weights.")
    hungry = starved(cm, classes, train_labels, cfg) if train_labels is not None else None
    if hungry:
        notes.append(hungry)
    predicted = cm.sum(0)
    never = [classes[i] for i in range(len(classes)) if predicted[i] == 0 and cm.sum(1)[i] > 0]
    if never:
        notes.append(f"Never predicted on the test split: {', '.join(never[:10])}"
                     f"{' ...' if len(never) > 10 else ''}. The class may be too rare or too hard.")
    return notes
