"""cnnlab: train, evaluate, explain and export CNN image classifiers.

    import cnnlab
    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=3)
    model = cnnlab.load(result.run_dir)
    model.predict(["digit.png"])
"""
__version__ = "0.1.0"

from .api import explain, load, train  # noqa: E402  (after __version__, which cli.py imports alone)
from .tuning import tune  # noqa: E402
