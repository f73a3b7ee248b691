"""cnnlab: train, evaluate, explain and export CNN image classifiers.

    import cnnlab
    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=3)
    model = cnnlab.load(result.run_dir)
    model.predict(["digit.png"])
"""
__version__ = "0.1.0"


def train(config=None, resume=None, quiet=False, **settings):
    """Train with the CLI's settings as keyword arguments (train(data="cifar10", epochs=5, lr=0.01))."""
    from .train.loop import fit

    return fit(config, resume=resume, quiet=quiet, **settings)


def load(path, device="cpu"):
    """Rebuild a trained model from a checkpoint file or run folder (no code is run from the file)."""
    from .deploy.inference import load as _load

    return _load(path, device=device)
