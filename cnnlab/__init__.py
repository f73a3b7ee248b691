"""cnnlab: train, evaluate, explain and export CNN image classifiers.

    import cnnlab
    result = cnnlab.train(data="mnist-5k", model="mnist_cnn", epochs=3)
    model = cnnlab.load(result.run_dir)
    model.predict(["digit.png"])

Your own network and data plug in as they are (see `help(cnnlab.train)`):

    result = cnnlab.train(model=Net(), data=(x_train, y_train, x_test, y_test), epochs=3)
    cnnlab.load(result.run_dir, plugins=["net.py"])       # in a new process: the module defining Net

    @cnnlab.register_model("tinynet")                      # in net.py: `cnnlab train --plugin net.py --model tinynet`
    class TinyNet(nn.Module): ...

The API: train, launch (DDP), load, evaluate, predict, export, explain, audit, lr_find, tune, register_model,
register_dataset.
"""
__version__ = "0.1.0"

from .threads import quiet_waits  # noqa: E402

quiet_waits()   # first, before anything imports torch: OpenMP reads its wait policy once (threads.py)

from .api import audit, evaluate, explain, export, launch, load, lr_find, predict, train  # noqa: E402  (after __version__, which cli.py imports alone)
from .plugins import register_dataset, register_model  # noqa: E402
from .tuning import tune  # noqa: E402

__all__ = ["train", "load", "evaluate", "predict", "export", "explain", "audit", "launch", "lr_find", "tune", "register_model", "register_dataset"]
