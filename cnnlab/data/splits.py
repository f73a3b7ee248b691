"""Seeded, stratified train / val / test splits, recorded as index lists so they can be saved
with a run and used again by `evaluate`."""
import torch


def stratified_order(y, seed):
    """A seeded permutation of range(len(y)) whose every prefix holds each class in proportion.

    Each sample gets (its rank inside its class + 0.5) / class size after a seeded shuffle;
    sorting by that interleaves the classes evenly.
    """
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    ys = y[perm]
    frac = torch.empty(len(y), dtype=torch.float64)
    for c in torch.unique(ys):
        where = (ys == c).nonzero().flatten()
        frac[where] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    return perm[torch.sort(frac, stable=True).indices]


def take(y, n, seed):
    """(taken, rest): a stratified sample of n indices and the remaining ones, each sorted."""
    order = stratified_order(y, seed)
    return torch.sort(order[:n]).values, torch.sort(order[n:]).values


def make_splits(train_y, test_y, cfg):
    """Index lists {'train', 'val', 'test'} and which pool the test indices point into."""
    seed = cfg.seed
    pool = torch.arange(len(train_y))
    if test_y is None:
        n_test = max(1, round(len(train_y) * cfg.test_fraction))
        test, pool = take(train_y, n_test, seed + 1)
        test_pool = "train"
    else:
        test, test_pool = torch.arange(len(test_y)), "test"
    n_val = round(len(pool) * cfg.val_fraction)
    val_rel, train_rel = take(train_y[pool], n_val, seed + 2)
    train, val = pool[train_rel], pool[val_rel]
    splits = {"train": train, "val": val, "test": test}
    caps = {"train": cfg.train_samples, "val": cfg.val_samples, "test": cfg.test_samples}
    for name, cap in caps.items():
        idx = splits[name]
        if cap and cap < len(idx):
            labels = test_y[idx] if name == "test" and test_pool == "test" else train_y[idx]
            kept, _ = take(labels, cap, seed + 3)
            splits[name] = idx[kept]
    return {k: v.tolist() for k, v in splits.items()} | {"test_pool": test_pool}
