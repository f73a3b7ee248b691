"""Plain-language diagnostics of a finished run, for summary.json and the report."""
import math


def diagnose(history, cm, classes, raw_val_acc=None):
    """`raw_val_acc`: with --ema, the raw (not averaged) last weights' validation accuracy."""
    notes = []
    if not history:
        return notes
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
    predicted = cm.sum(0)
    never = [classes[i] for i in range(len(classes)) if predicted[i] == 0 and cm.sum(1)[i] > 0]
    if never:
        notes.append(f"Never predicted on the test split: {', '.join(never[:10])}"
                     f"{' ...' if len(never) > 10 else ''}. The class may be too rare or too hard.")
    return notes
