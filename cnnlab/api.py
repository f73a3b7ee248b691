"""The Python API (re-exported by cnnlab/__init__.py): train, load, evaluate, predict, export, lr_find.

It sits on top of the pipeline: it turns the user's own objects (an nn.Module, arrays, a Dataset)
into registry names (plugins.py, data/arrays.py), resolves the settings, runs training.loop.fit
with the callbacks of the later stages (the report, from evaluation/) and wraps the finished state in
a `Result`. Imports happen inside the functions so `import cnnlab` (and `cnnlab --help`) stay fast."""
import os


class Result:
    """What `cnnlab.train()` returns: the run folder, its summary and per-epoch history.
    `result.model()` loads its best weights (a cnnlab.Model, ready to predict)."""

    def __init__(self, run_dir, summary, history):
        self.run_dir, self.summary, self.history = run_dir, summary, history

    def plot(self):
        from .evaluation.plots import curves_figure

        return curves_figure(self.history)

    def model(self, device="cpu"):
        return load(self.run_dir, device=device)

    def __repr__(self):
        return f"Result(run_dir={self.run_dir!r}, test_acc={self.summary.get('test_acc')})"

    def _repr_html_(self):
        """Jupyter shows the summary, the training curves and the confusion matrix."""
        from .evaluation.report import notebook_html

        keys = ("model", "data", "test_acc", "final_test_acc", "best_val_acc", "epochs", "num_params", "train_seconds")
        return notebook_html(f"cnnlab run {self.run_dir}", [(k, self.summary.get(k)) for k in keys], self.run_dir)


def train(config=None, resume=None, quiet=False, callbacks=(), plugins=(), **settings):
    """Train a classifier and return a Result (run_dir, summary, history); the run folder holds
    best.pt, last.pt, metrics.csv, summary.json and report.html, as `cnnlab train` writes them.

    model: a name from `cnnlab models`, or your own network: an nn.Module instance (`Model()`,
        trained from its current weights, which end as the run's best ones), a class or a factory
        (built with `model_args`, and with `in_shape` / `num_classes` if its signature names them).
    data: a name from `cnnlab datasets`, a folder of class subfolders, a .npz file, arrays
        `(x, y)` or `(x, y, x_test, y_test)` (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 or
        floats in [0, 1], labels 0..K-1), a torch Dataset, or `(train_dataset, test_dataset)`.
    config: a TrainConfig to start from; resume: a run folder to continue exactly (hand the same
        model and data objects over again); callbacks: objects with training hooks
        (cnnlab.training.callbacks); plugins: your modules (files or names) defining models or
        datasets (@cnnlab.register_model / @cnnlab.register_dataset).

        >>> result = cnnlab.train(model=Model(), data=(x, y, x_test, y_test), epochs=3, lr=0.01)
        >>> result.summary["test_acc"]
        >>> cnnlab.train(resume=result.run_dir, model=Model, data=(x, y, x_test, y_test), epochs=5)
    """
    from .models import model_args
    from .plugins import use
    from .training.loop import fit
    from .training.resume import resolve_config

    use(plugins)
    settings, instance = own_objects(settings)
    cfg = resolve_config(config, resume, settings)
    model_args(cfg.model, cfg.model_args)   # a user model's module:Class is found in `plugins` (or refused) here
    start = [StartFrom(instance)] if instance is not None and not resume else []
    state = fit(cfg, resume=resume, quiet=quiet, callbacks=[*start, *callbacks, *report_callbacks(cfg)])
    if instance is not None:   # like Keras' fit: the object handed over holds the trained (best) weights
        instance.load_state_dict(state.model.state_dict())
    return Result(state.run_dir, state.summary, state.history)


def own_objects(settings):
    """The user's objects among the settings -> registry names: (settings, the model instance or None)."""
    from .data.arrays import memory_name
    from .plugins import model_setting

    settings, instance = dict(settings), None
    if "model" in settings and not isinstance(settings["model"], str):
        settings["model"], settings["model_args"], instance = model_setting(settings["model"],
                                                                          settings.get("model_args"))
    data = settings.get("data")
    if isinstance(data, os.PathLike):
        settings["data"] = os.fspath(data)
    elif data is not None and not isinstance(data, str):
        settings["data"] = memory_name(data, settings.get("class_names"))
    return settings, instance


class StartFrom:
    """A callback (only the hook it has is called): a new run starts from the weights of the
    instance the user handed over (the network was rebuilt from its class; the EMA copy starts
    from them too)."""

    def __init__(self, instance):
        self.weights = {k: v.detach().clone() for k, v in instance.state_dict().items()}

    def on_start(self, state):
        state.model.load_state_dict(self.weights)
        if state.ema is not None:
            state.ema.module.load_state_dict(self.weights)


def report_callbacks(cfg):
    """--report (on by default): the run's pictures and report.html from training's own test results."""
    if not cfg.report:
        return []
    from .evaluation.report import ReportWriter

    return [ReportWriter()]


def load(path, device="cpu", plugins=()):
    """Rebuild a trained model from a checkpoint file or run folder (no code is run from the file).
    A model of your own needs the module that defines it: `plugins=["mymodel.py"]`.

        >>> model = cnnlab.load("runs/mnist", plugins=["mymodel.py"])
        >>> model.predict(["digit.png"], top_k=3)     # paths, PIL images or uint8 arrays
    """
    from .deploy.inference import load as load_model
    from .plugins import use

    use(plugins)
    return load_model(path, device=device)


def launch(nproc, config=None, plugins=(), **settings):
    """Train with DDP on `nproc` processes of this machine, as `cnnlab train --nproc N` does, with
    train's settings; returns the Result. The processes are new, so the model and data must be
    names they can find again: built-in names, folders, or register_model / register_dataset
    entries of the modules in `plugins` (objects and in-memory arrays cannot cross; one line says so).

        >>> cnnlab.launch(2, data="mnist-5k", model="mnist_cnn", epochs=3, out="runs/ddp")
    """
    import tempfile

    from .config import dump_yaml, make_config
    from .errors import CnnlabError, UsageError
    from .plugins import use
    from .training.distributed import launch as torchrun
    from .training.resume import with_data_name
    from .training.run_folder import default_name, read_json, read_metrics

    for key in ("model", "data"):
        if key in settings and not isinstance(settings[key], (str, os.PathLike)):
            raise UsageError(f"cnnlab.launch starts new processes, which cannot be handed your {key} object: "
                             f"register it in a module (cnnlab.register_{key if key == 'model' else 'dataset'}) "
                             "and pass plugins=[that file], or give a name or a folder.")
    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    use(plugins)   # the names are checked here, before any process starts
    cfg = with_data_name(make_config(settings, base=config))
    out = cfg.out or os.path.join("runs", default_name(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = os.path.join(tmp, "launch.yaml")
        dump_yaml(make_config({"out": out}, base=cfg), recipe)
        code = torchrun(nproc, ["--config", recipe, *(a for p in plugins for a in ("--plugin", os.fspath(p)))])
    if code:
        raise CnnlabError(f"distributed training ended with exit status {code} (its report is above); "
                          f"cnnlab.train(resume={out!r}) continues from last.pt, if it was written.")
    return Result(out, read_json(os.path.join(out, "summary.json")), read_metrics(out))


def evaluate(path, data=None, split="test", plugins=()):
    """Metrics (accuracy, loss, per-class precision/recall/F1) of a run or checkpoint on its own
    data's split, or on `data` (a name, or arrays / a Dataset as for train).

        >>> cnnlab.evaluate("runs/mnist", data=(x, y, x_test, y_test))["accuracy"]
    """
    from .evaluation.results import evaluate_path
    from .plugins import use

    use(plugins)
    data = own_objects({"data": data})[0]["data"] if data is not None else None
    metrics = evaluate_path(str(path), data, split)
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def predict(path, images, top_k=5, plugins=()):
    """Top-k predictions per image (a path, PIL image or array): lists of {label, index, probability}.

        >>> cnnlab.predict("runs/mnist", ["digit.png"], top_k=3)
    """
    return load(path, plugins=plugins).predict(images, top_k=top_k)


def export(path, format="onnx", out=None, plugins=(), **options):
    """Write ONNX or TorchScript (checked against PyTorch on a batch) beside the checkpoint, or at
    `out`; the file needs no cnnlab and none of your code. Options as `cnnlab export`'s flags:
    raw_input, probabilities, quantize, max_drop. Returns the path written.

        >>> cnnlab.export("runs/mnist", "onnx", plugins=["mymodel.py"])
    """
    from .deploy.export import export as export_file
    from .plugins import use

    use(plugins)
    return export_file(str(path), format, out, **options)[0]


def lr_find(plugins=(), **settings):
    """The learning-rate range test with train's settings (model and data objects too): 100 steps
    from lr 1e-7 to 10; returns the curve (lrs, losses) and `.suggestion`.

        >>> cnnlab.lr_find(model=Model, data=(x, y)).suggestion
    """
    from .config import make_config
    from .plugins import use
    from .training.lr_find import lr_find as range_test
    from .training.resume import with_data_name

    use(plugins)
    cfg = with_data_name(make_config(own_objects(settings)[0]))
    return range_test(cfg)


def settings_doc():
    """Every TrainConfig field with its default (and the CLI's help), for help(cnnlab.train)."""
    import dataclasses

    from .cli import HELP
    from .config import CHOICES, TrainConfig

    lines = ["", "    Settings (keyword arguments; the same as `cnnlab train` flags and recipe keys):"]
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        extra = HELP.get(f.name) or (" | ".join(CHOICES[f.name]) if f.name in CHOICES else "")
        lines.append(f"        {f.name} = {default!r}" + (f": {extra}" if extra else ""))
    return "\n".join(lines) + "\n"


train.__doc__ += settings_doc()


def explain(run, images, target=None, layer=None, out=None):
    """Grad-CAM overlays of image files with a run's model (cnnlab explain): see deploy/explain.py."""
    from .deploy.explain import explain as explain_files

    return explain_files(run, images, target=target, layer=layer, out=out)


def audit(data, **options):
    """Check a dataset (cnnlab audit): suspect labels, outliers, duplicates and leaks, odd images,
    class balance; writes audit.json and audit.html and returns the findings. `data`: a --data name
    or a loaded Data; options as evaluation/audit.py's audit() (out, folds, epochs, limit, fix_list, ...)."""
    from .evaluation.audit import audit as audit_data

    return audit_data(data, **options)
