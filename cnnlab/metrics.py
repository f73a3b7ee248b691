"""Classification metrics as pure tensor functions of a confusion matrix (rows = true class; the
matrix itself is counted by the evaluation loop, training/engine.py)."""
import torch


def _safe_div(a, b):
    """a / b, and 0 where b == 0 (scikit-learn's zero_division=0). The divisor is replaced, not
    clamped: clamping to 1 would be wrong for fractional divisors such as precision + recall."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def per_class(cm):
    """Precision, recall, F1 and support per class. A class never predicted has precision 0 (as
    scikit-learn's zero_division=0)."""
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    precision = _safe_div(tp, cm.sum(0))
    recall = _safe_div(tp, support)
    # 2PR / (P + R) written with counts, 2TP / (2TP + FP + FN): exact, and 0 when TP = 0
    f1 = _safe_div(2 * tp, support + cm.sum(0))
    return precision, recall, f1, support


def balanced_accuracy(cm):
    """The mean recall over the classes present (support > 0), as scikit-learn's
    balanced_accuracy_score: a classifier that ignores a rare class loses 1/K, not its tiny share."""
    _, recall, _, support = per_class(cm)
    present = support > 0
    return float(recall[present].mean()) if present.any() else 0.0


def summarize(cm, classes, loss=None, top5=None):
    """The report dict: accuracy, loss, per-class rows, macro and weighted averages, the matrix."""
    precision, recall, f1, support = per_class(cm)
    total = support.sum().clamp_min(1)
    weights = support / total
    rows = [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)]
    out = {"accuracy": float(cm.diag().sum() / total), "balanced_acc": balanced_accuracy(cm),
           "loss": loss, "samples": int(support.sum()),
           "per_class": rows,
           "macro_avg": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
           "weighted_avg": {"precision": float((precision * weights).sum()),
                            "recall": float((recall * weights).sum()), "f1": float((f1 * weights).sum())},
           "confusion_matrix": cm.tolist()}
    if top5 is not None:
        out["top5_accuracy"] = top5
    return out
