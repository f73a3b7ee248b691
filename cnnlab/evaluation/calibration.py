"""Calibration: does a probability of 0.9 mean right 90% of the time? Expected calibration error
(ECE) over equal-width confidence bins (Guo et al. 2017; Naeini et al. 2015), the numbers behind a
reliability diagram. Pure tensor functions; temperature fitting is training/temperature.py."""
import torch

BINS = 15   # the usual count since Guo et al. 2017 (torchmetrics' default too)


def reliability(probs, labels, bins=BINS):
    """Per confidence bin (lower edge exclusive: (i/bins, (i+1)/bins]): the number of samples, their
    mean confidence (top-1 probability) and their accuracy. probs (N, K), labels (N,).
    Returns three (bins,) float64 tensors: count, confidence, accuracy (0 where a bin is empty)."""
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels).long()
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    inner_edges = torch.tensor([i / bins for i in range(1, bins)], dtype=torch.float64)
    index = torch.bucketize(confidence, inner_edges)   # i where edge[i] < c <= edge[i + 1]
    count = torch.bincount(index, minlength=bins).double()
    mean = lambda values: torch.bincount(index, weights=values, minlength=bins) / count.clamp(min=1)
    return count, mean(confidence), mean(correct)


def ece(probs, labels, bins=BINS):
    """Expected calibration error: sum over bins of |bin| / N * |accuracy - confidence|, in [0, 1]."""
    count, confidence, accuracy = reliability(probs, labels, bins)
    return float((count / count.sum().clamp(min=1) * (accuracy - confidence).abs()).sum())
