"""Pictures of a run. These functions only read results; they never train."""
import math

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from ..atomic import atomic_path  # noqa: E402


def _save(fig, path):
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _epoch_axis(ax):
    """Whole epochs only: a 2-epoch run gets ticks 1 and 2, not 1.0, 1.2, ... 2.0."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))   # min 1: a 1-epoch run too
    ax.grid(alpha=0.3)


def curves_figure(history):
    """Loss and accuracy, train vs val, per epoch (the tutorials' two plots, side by side)."""
    epochs = [row["epoch"] for row in history]
    _, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="val")
    return _finish_panels(((ax_loss, "loss"), (ax_acc, "accuracy")), ax_acc)


def _finish_panels(panels, acc_ax, **legend):
    """Title, whole-epoch axis and legend for each (ax, title) of a per-epoch figure; accuracy in
    percent. Returns the figure."""
    for ax, title in panels:
        ax.set_title(title)
        _epoch_axis(ax)
        ax.legend(**legend)
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    return acc_ax.figure


def save_curves(history, path):
    return _save(curves_figure(history), path)


def confusion_figure(cm, classes):
    """Counts and the row-normalised view (recall per true class) side by side."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    size = min(max(5, 0.45 * k + 2), 30)
    # constrained layout makes room for tick labels, so the right plot's "true" clears the left plot
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for ax, values, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        ax.imshow(values, cmap="Blues")
        ax.set_title(f"confusion matrix ({title})")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ticks = range(k)
        labels = classes if k <= 40 else [""] * k
        ax.set_xticks(ticks, labels, rotation=90 if k > 10 or max(map(len, classes)) > 3 else 0)
        ax.set_yticks(ticks, labels)
        if k <= 20:
            top = values.max() or 1
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8,
                            color="white" if values[i, j] > top / 2 else "black")
    return fig


def save_confusion(cm, classes, path):
    return _save(confusion_figure(cm, classes), path)


def _show(ax, img):
    """Show a (C, H, W) uint8 image (the stored pixels: no normalisation to undo)."""
    img = np.asarray(img)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img[:3].transpose(1, 2, 0))
    ax.axis("off")


def save_samples(images, labels, classes, path, n=20):
    """A 2x10 grid of training images with their labels (seed 003's picture)."""
    n = min(n, len(labels))
    cols = min(10, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax, img, y in zip(axes.flat, images[:n], labels[:n]):
        _show(ax, img)
        ax.set_title(classes[int(y)], fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, path)


def top_losses(losses, n=16):
    """Indices of the `n` highest losses, highest first (the images save_mistakes shows)."""
    return np.argsort(-np.asarray(losses))[:n]


def save_mistakes(images, labels, probs, losses, classes, path, n=16, heatmaps=None):
    """The highest-loss test images: true label, predicted label and its probability
    (fastai's plot_top_losses); `heatmaps`: {index: (H, W) array in [0, 1]} drawn over them
    (Grad-CAM of the predicted class, explain.py)."""
    order = top_losses(losses, n)
    cols = min(8, max(1, len(order)))
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for ax, i in zip(axes.flat, order):
        pred = int(np.argmax(probs[i]))
        _show(ax, images[i])
        if heatmaps is not None and int(i) in heatmaps:
            ax.imshow(heatmaps[int(i)], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"true {classes[int(labels[i])]}\npred {classes[pred]} {probs[i][pred]:.0%}",
                     fontsize=9, color="red" if pred != int(labels[i]) else "black")
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    fig.suptitle("highest-loss test images")
    return _save(fig, path)


def save_reliability(count, confidence, accuracy, ece, path):
    """The reliability diagram: accuracy per confidence bin against the diagonal of perfect
    calibration (bars under it: over-confident), with each bin's share of the images below."""
    count, confidence, accuracy = (np.asarray(v, dtype=float) for v in (count, confidence, accuracy))
    bins = len(count)
    centers, width = (np.arange(bins) + 0.5) / bins, 1 / bins
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    ax.bar(centers[filled], accuracy[filled], width=width, edgecolor="black", label="accuracy")
    # hatched, not filled: under the diagonal (under-confident) the gap lies over the accuracy bar,
    # and a translucent fill there read as a shorter bar of another colour
    ax.bar(centers[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width, fill=False,
           hatch="//", edgecolor="red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE {ece:.2%}, {bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(centers, count / max(count.sum(), 1), width=width, edgecolor="black")
    ax_n.set(xlabel="confidence (top-1 probability)", ylabel="share")
    return _save(fig, path)


def per_class_figure(rows):
    """Per-class recall (accuracy within the class) and F1 as horizontal bars: class names of any
    length read level, one per row, and the legend sits outside the bars."""
    names = [r["class"] for r in rows]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, min(1.2 + 0.3 * len(names), 30)))
    ax.barh(y - 0.2, [r["recall"] for r in rows], 0.4, label="accuracy (recall)")
    ax.barh(y + 0.2, [r["f1"] for r in rows], 0.4, label="F1")
    ax.set_yticks(y, names if len(names) <= 100 else [""] * len(names))
    ax.set_ylim(len(names) - 0.5, -0.5)   # first class on top, as in the tables
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title("per-class test metrics")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def save_per_class(rows, path):
    return _save(per_class_figure(rows), path)


def compare_figure(histories):
    """Validation accuracy and loss of several runs, overlaid."""
    _, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    for name, history in histories.items():
        epochs = [row["epoch"] for row in history]
        ax_acc.plot(epochs, [row["val_acc"] for row in history], "o-", label=name)
        ax_loss.plot(epochs, [row["val_loss"] for row in history], "o-", label=name)
    return _finish_panels(((ax_acc, "validation accuracy"), (ax_loss, "validation loss")), ax_acc, fontsize=8)


def save_compare(histories, path):
    return _save(compare_figure(histories), path)


def save_lr_find(lrs, losses, suggestion, path, minimum=None):
    """The range test's curve; `minimum`: the (lr, loss) of the lowest loss, whose lr/10 is suggested."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    if minimum is not None:
        ax.plot(*minimum, "o", color="black", label=f"lowest loss, lr {minimum[0]:.2e}")
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    # the last, diverged point can be many times the start (7 vs 2.3 on MNIST): cut it off
    low, high = min(losses), min(max(losses), 1.5 * losses[0])
    pad = 0.05 * (high - low) or 0.1
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("LR range test")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
