"""The Python API: `cnnlab.train()` and `cnnlab.load()` (re-exported by cnnlab/__init__.py).

It sits on top of the pipeline: it resolves the settings, runs train.loop.fit with the callbacks
of the later stages (the report, from evaluate/) and wraps the finished state in a `Result`.
Imports happen inside the functions so `import cnnlab` (and `cnnlab --help`) stay fast."""


class Result:
    """What `cnnlab.train()` returns: the run folder, its summary and per-epoch history."""

    def __init__(self, run_dir, summary, history):
        self.run_dir, self.summary, self.history = run_dir, summary, history

    def plot(self):
        from .evaluate.plots import curves_figure

        return curves_figure(self.history)

    def __repr__(self):
        return f"Result(run_dir={self.run_dir!r}, test_acc={self.summary.get('test_acc')})"


def train(config=None, resume=None, quiet=False, callbacks=(), **settings):
    """Train with the CLI's settings as keyword arguments (train(data="cifar10", epochs=5, lr=0.01));
    `config`: a TrainConfig to start from; `resume`: a run folder to continue exactly; `callbacks`:
    objects with training hooks (cnnlab.training.callbacks). Returns a Result."""
    from .training.loop import fit
    from .training.resume import resolve_config

    cfg = resolve_config(config, resume, settings)
    state = fit(cfg, resume=resume, quiet=quiet, callbacks=[*callbacks, *report_callbacks(cfg)])
    return Result(state.run_dir, state.summary, state.history)


def report_callbacks(cfg):
    """--report (on by default): the run's pictures and report.html from training's own test results."""
    if not cfg.report:
        return []
    from .evaluate.report import ReportWriter

    return [ReportWriter()]


def load(path, device="cpu"):
    """Rebuild a trained model from a checkpoint file or run folder (no code is run from the file)."""
    from .deploy.inference import load as load_model

    return load_model(path, device=device)


def explain(run, images, target=None, layer=None, out=None):
    """Grad-CAM overlays of image files with a run's model (cnnlab explain): see deploy/explain.py."""
    from .deploy.explain import explain as explain_files

    return explain_files(run, images, target=target, layer=layer, out=out)
