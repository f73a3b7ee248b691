"""`cnnlab predict`: classify image files and folders with a checkpoint's own preprocessing.
Each unreadable file is reported on its own line; the rest are still predicted."""
import json
import os

import torch

from ..data.folder import list_images
from ..data.images import IMAGE_SUFFIXES, open_image
from ..errors import CnnlabError, UsageError, note
from .inference import check_top_k, load


def expand(paths):
    """Files as given, folders searched recursively for images; a missing path is kept to be
    reported as an error of its own. No file at all (empty folders) is a UsageError."""
    files = []
    for p in paths:
        files += list_images(p) if os.path.isdir(p) else [p]
    if not files:
        raise UsageError(f"no image file in {', '.join(map(str, paths))}: give image files, or folders holding "
                         f"them ({', '.join(IMAGE_SUFFIXES)}; subfolders are searched too).")
    return files


def warn_unlike_training(model, unlike):
    """One stderr line for inputs far from the training images (a photo into a digit model): the
    model still scores them, confidently and meaninglessly."""
    (path, what), more = unlike[0], len(unlike) - 1
    note(f"warning: {path} ({what}) is unlike the {model.training_images()} images this model was trained on; "
         "its scores mean little" + (f" (and {more} more such input(s))." if more else "."))


def predict_files(checkpoint_path, paths, top_k=3, as_json=False, invert=False, batch_size=256, backend=None,
                  tta="none"):
    check_top_k(top_k)
    files = expand(paths)   # an empty folder is refused before the model loads
    model = load(checkpoint_path, backend=backend)
    model.tta = tta
    results, ok_items, unlike = [], [], []
    for path in files:
        try:
            img = open_image(path, size=model.preprocess.decode_size)
            if what := model.unlike_training(img):
                unlike.append((path, what))
            ok_items.append((len(results), model.preprocess.image(img, invert=invert or None)))
            results.append({"path": path})
        except CnnlabError as e:
            results.append({"path": path, "error": str(e)})
    if unlike:
        warn_unlike_training(model, unlike)
    for i in range(0, len(ok_items), batch_size):  # batched: one forward pass per 256 images
        chunk = ok_items[i:i + batch_size]
        preds = model.classify(torch.stack([x for _, x in chunk]), top_k)
        for (index, _), pred in zip(chunk, preds):
            results[index]["predictions"] = pred
            if tta != "none":   # the output says how its probabilities were made
                results[index]["tta"] = tta
    failed = sum("error" in r for r in results)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:   # the error names the file itself: said once
                message = r["error"].removeprefix(f"{r['path']}: ")
                note(f"{r['path']}: error: {message}")
            else:
                guesses = ", ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
                print(f"{r['path']}: {guesses}" + (f"  (tta {tta})" if tta != "none" else ""))
    if failed:
        note(f"cnnlab: {failed} of {len(results)} file(s) could not be read")
    return 1 if failed else 0
