"""cnnlab: train, evaluate, explain and export CNN image classifiers.

    import cnnlab
    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=3)
    model = cnnlab.load(result.run_dir)
    model.predict(["digit.png"])
"""
__version__ = "0.1.0"

# `cnnlab.train` is the training stage's package, and calling it is api.train (see train/__init__.py).
from . import train  # noqa: E402  (after __version__, which cli.py imports alone)
from .api import load  # noqa: E402
