"""`cnnlab explain RUN IMAGES...` and `cnnlab.explain()`: Grad-CAM overlays of image files (one PNG
per image beside a contact sheet), computed by evaluation/explain.py on the checkpoint's network."""
import os

import torch

from ..data.images import open_image
from ..errors import CnnlabError, UsageError, note
from ..evaluation.explain import write_explanations
from .inference import load
from .predict import expand


def read_images(model, paths, invert=False):
    """(uint8 batch, the paths read, the count that could not be); a file that cannot be read is
    noted on stderr and skipped."""
    images, read, files = [], [], expand(paths)
    for path in files:
        try:
            images.append(model.preprocess.image(open_image(path, size=model.preprocess.decode_size),
                                                 invert=invert or None))
            read.append(path)
        except CnnlabError as e:   # the error names the file itself: said once
            note(f"{path}: error: {str(e).removeprefix(f'{path}: ')}")
    if not images:
        raise UsageError(f"no readable image among {', '.join(map(str, paths))}.")
    return torch.stack(images), read, len(files) - len(read)


def explain(run, images, target=None, layer=None, out=None, invert=False, quiet=True):
    """Grad-CAM of image files and folders with a run's model: writes NAME.gradcam.png per image and
    contact_sheet.png into `out` (default RUN/explain) and returns one dict per image (path,
    predicted, probability, target, target_probability, layer, heatmap, png)."""
    model = load(run)
    batch, read, unread = read_images(model, images if isinstance(images, (list, tuple)) else [images], invert)
    results = model.explain(batch, target=target, layer=layer)
    run_dir = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    out = out or os.path.join(run_dir, "explain")
    pngs = write_explanations(batch.numpy(), results, read, out)
    for r, path, png in zip(results, read, pngs):
        r.update(path=path, png=png)
        if not quiet:
            print(f"{path}: predicted {r['predicted']} {r['probability']:.1%}; Grad-CAM of {r['target']} "
                  f"({r['target_probability']:.1%}) -> {png}")
    if not quiet:
        print(f"layer '{results[0]['layer']}'; contact sheet: {pngs[-1]}")
    if unread:
        note(f"cnnlab: {unread} of {unread + len(read)} file(s) could not be read")
    return results
