"""The search space: a YAML mapping of settings to distributions, checked once before any trial.

    lr: {log_uniform: [1.0e-4, 1.0e-1]}
    model: {choice: [net_width, net_bn, net_res]}
    model_args.n_chans1: {int: [16, 64]}
    batch_size: {choice: [32, 64, 128]}

Keys are `cnnlab train` settings (the YAML names) or `model_args.KNOB`. The data settings are
refused: every trial must see the same images and the same validation split, or their
accuracies could not be compared."""
import dataclasses
import os

from ..config import FIELD_TYPES, DataConfig, load_yaml, make_config
from ..errors import UsageError, unknown

SPACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "spaces")
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int", "log_int")
# What decides the images and the splits, and what says where a run goes: fixed by the base config.
FIXED = tuple(f.name for f in dataclasses.fields(DataConfig)) + ("out", "overwrite", "report", "device")


def space_names():
    return sorted(f[:-5] for f in os.listdir(SPACES) if f.endswith(".yaml")) if os.path.isdir(SPACES) else []


def space_path(value):
    """--space: a YAML file, or the name of a search space shipped with cnnlab (recipes/spaces/)."""
    if os.path.isfile(value):
        return value
    if value in space_names():
        return os.path.join(SPACES, value + ".yaml")
    if os.sep in value or value.endswith((".yaml", ".yml")):
        raise UsageError(f"search space file not found: {value}.")
    raise unknown("search space", value, space_names())


def read_space(space, base):
    """{key: (distribution, arguments)} from a YAML path or a dict, every key and range checked
    against the base TrainConfig `base` (a bad value fails here, not in trial 7)."""
    where = space if isinstance(space, str) else "the search space"
    values = load_yaml(space_path(space)) if isinstance(space, str) else dict(space or {})
    if not values:
        raise UsageError(f"{where} is empty; give at least one setting, e.g. lr: {{log_uniform: [1.0e-4, 1.0e-1]}}.")
    return {str(key): parse_dimension(str(key), spec, base, where) for key, spec in values.items()}


def parse_dimension(key, spec, base, where):
    check_key(key, where)
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise UsageError(f"{where}: '{key}' must map to one distribution, e.g. {key}: {{choice: [a, b]}} or "
                         f"{{uniform: [low, high]}}; got {spec!r}.")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise unknown(f"distribution for '{key}' in {where}", kind, DISTRIBUTIONS)
    args = check_choice(key, args, where) if kind == "choice" else check_range(key, kind, args, where)
    for value in args:   # each end of a range and each choice must be a valid setting on its own
        check_value(key, value, base, where)
    return kind, args


def check_key(key, where):
    if key.startswith("model_args."):
        if not key[len("model_args."):]:
            raise UsageError(f"{where}: '{key}' names no model knob; write model_args.KNOB, e.g. model_args.width.")
        return
    if key not in FIELD_TYPES:
        raise unknown(f"search space key in {where} (a setting of `cnnlab train`, or model_args.KNOB)", key,
                      FIELD_TYPES)
    if key in FIXED or key == "model_args":
        hint = " (write model_args.KNOB for one knob)" if key == "model_args" else \
            " (every trial must see the same data and validation split)"
        raise UsageError(f"{where}: '{key}' cannot be searched{hint}; set it in the base --config.")


def check_choice(key, args, where):
    if not isinstance(args, list) or not args:
        raise UsageError(f"{where}: '{key}: {{choice: ...}}' needs a non-empty list, e.g. choice: [32, 64]; "
                         f"got {args!r}.")
    if any(not isinstance(v, (str, int, float, bool)) for v in args):
        raise UsageError(f"{where}: '{key}' choices must be plain values (text, numbers, true/false); got {args!r}.")
    return args


def check_range(key, kind, args, where):
    number = int if kind.endswith("int") else float
    example = "[16, 64]" if number is int else "[1.0e-4, 1.0e-1]"
    ok = isinstance(args, list) and len(args) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in args)
    if ok and number is int:
        ok = all(float(v).is_integer() for v in args)
    if not ok:
        raise UsageError(f"{where}: '{key}: {{{kind}: ...}}' needs [low, high] as {number.__name__}s, e.g. "
                         f"{kind}: {example}; got {args!r}.")
    low, high = number(args[0]), number(args[1])
    if not low < high:
        raise UsageError(f"{where}: '{key}: {{{kind}: [{low}, {high}]}}': low must be below high.")
    if kind.startswith("log") and low <= 0:
        raise UsageError(f"{where}: '{key}: {{{kind}: [{low}, {high}]}}': a log scale needs low > 0 "
                         "(use uniform to include 0).")
    return [low, high]


def check_value(key, value, base, where):
    if key.startswith("model_args."):
        return    # a model knob is checked by the model itself, in the trial that builds it
    from ..training.loop import check_names

    try:
        check_names(make_config({key: value}, base=base))   # a model's name too, not only its type
    except UsageError as e:
        raise UsageError(f"{where}: '{key}' value {value!r}: {e}") from None


def suggest(trial, space):
    """One sample of every setting, asked of the Optuna trial (its sampler decides)."""
    ask = {"choice": lambda name, a: trial.suggest_categorical(name, a),
           "uniform": lambda name, a: trial.suggest_float(name, *a),
           "log_uniform": lambda name, a: trial.suggest_float(name, *a, log=True),
           "int": lambda name, a: trial.suggest_int(name, *a),
           "log_int": lambda name, a: trial.suggest_int(name, *a, log=True)}
    return {name: ask[kind](name, args) for name, (kind, args) in space.items()}


def config_with(base, params, out):
    """The TrainConfig of one set of sampled settings: `model_args.KNOB` keys merged into the base's
    model_args, the rest as settings; the run folder is `out`."""
    model_args, settings = dict(base.model_args), {}
    for key, value in params.items():
        if key.startswith("model_args."):
            model_args[key[len("model_args."):]] = value
        else:
            settings[key] = value
    return make_config({**settings, "model_args": model_args, "out": out}, base=base)
