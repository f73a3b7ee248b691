"""`cnnlab predict`: classify image files and folders with a checkpoint's own preprocessing.
Each unreadable file is reported on its own line; the rest are still predicted."""
import json
import os
import sys

import torch

from .data.folder import list_images
from .errors import CnnlabError
from .inference import load


def expand(paths):
    """Files as given, folders searched recursively for images; a missing path is kept to be
    reported as an error of its own."""
    files = []
    for p in paths:
        files += list_images(p) if os.path.isdir(p) else [p]
    return files


def predict_files(checkpoint_path, paths, top_k=3, as_json=False, invert=False, batch_size=256):
    model = load(checkpoint_path)
    results, ok_items = [], []
    for path in expand(paths):
        try:
            ok_items.append((len(results), model.to_uint8(path, invert=invert or None)))
            results.append({"path": path})
        except CnnlabError as e:
            results.append({"path": path, "error": str(e)})
    for i in range(0, len(ok_items), batch_size):  # batched: one forward pass per 256 images
        chunk = ok_items[i:i + batch_size]
        preds = model.top_k(model.logits(torch.stack([x for _, x in chunk])), top_k)
        for (index, _), pred in zip(chunk, preds):
            results[index]["predictions"] = pred
    failed = sum("error" in r for r in results)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
            else:
                guesses = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
                print(f"{r['path']}: {guesses}")
    if failed:
        print(f"cnnlab: {failed} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0
