"""The configuration: typed dataclasses, defaults in one place, YAML in and out.

`DataConfig` holds what decides which images a run sees (data/ reads nothing else); `TrainConfig`
is it plus every training setting, flat, as in a recipe or on the command line, and hands data/
only its data part (`cfg.data_config()`). CLI flags are generated from these fields (cli.py), so a
flag and a YAML key are always the same name (`--batch-size` <-> `batch_size`). Unknown keys, wrong
types and out-of-range values raise UsageError with the culprit named.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field

from .errors import UsageError, unknown


@dataclass
class DataConfig:
    """The images a run sees: the source, its classes, the splits and their sizes, the image size."""
    data: str = "mnist-5k"
    data_dir: str = "data"
    classes: list = field(default_factory=list)   # keep only these classes (names or indices)
    class_names: list = field(default_factory=list)  # names for sources that carry none (npz without `classes`)
    val_fraction: float = 0.1
    test_fraction: float = 0.2                    # only for sources without an official test split
    train_samples: int = 0                         # 0 = all
    val_samples: int = 0
    test_samples: int = 0
    image_size: int = 0                            # 0 = chosen from the data
    on_bad_image: str = "error"
    seed: int = 0                                  # the splits' seed, and the run's
    # "train=0:20000,val=20000:25000,test=0:5000": index ranges in the source's own order (seed 004's
    # split) instead of seeded stratified samples; test rows index the official test set when there is one
    split_ranges: str = ""
    # dataset: the training split's own mean and std; none: pixels / 255 only (ToTensor, seeds 000 and
    # 003); "MEAN,STD" or one mean per channel then one std per channel (seed 004: 0.5,0.5)
    normalize: str = "dataset"
    # folder: and csv: data, decoded once into a memory-mapped cache on disk: its folder ("" =
    # $CNNLAB_CACHE or ~/.cache/cnnlab), and whether the splits are loaded into memory (auto: when
    # they fit half the memory available) or streamed from it batch by batch
    cache_dir: str = ""
    in_memory: str = "auto"
    fix_list: str = ""                             # a CSV from `cnnlab audit --fix-list`: its exclude rows left out, relabel rows relabelled
    # how images of other sizes become image_size squares (data/images.py FIT): auto = crop for folders
    # of images larger than --image-size (the photo pipeline), squash (stretched, as always) otherwise
    resize: str = "auto"
    resize_size: int = 0                           # crop: images stored at this side; 0 = ~1.15 x image_size


@dataclass
class TrainConfig(DataConfig):
    # data: DataConfig's fields, then how training varies the images
    augment: str = "auto"                          # auto, none, or parts joined by +: crop, flip|altflip, randaugment|trivialaugment
    crop_padding: int = 0                          # crop's shifts: up to this many pixels; 0 = auto (2 for digits, H/8 above)
    crop_padding_mode: str = "zeros"               # what crop's shifts fill the border with: zeros, or reflect (airbench's)
    augment_magnitude: int = 9                     # RandAugment's strength, 0-30 (torchvision's bins; 9 as in its paper)
    jitter: float = 0.0                            # colour jitter: brightness, contrast, saturation x U(1-J, 1+J)
    erase: float = 0.0                             # random erasing: the probability an image gets a blanked box
    mixup: float = 0.0                             # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0                            # Beta(alpha, alpha) of cutmix; 0 = off (with mixup: one or the other per batch)
    class_weights: str = "none"                    # loss weights: none, auto (inverse frequency) or w1,w2,...
    sampler: str = "shuffle"                       # shuffle; fixed: one order reused every epoch; balanced: classes equally often
    # model
    model: str = "mnist_cnn"
    model_args: dict = field(default_factory=dict)
    weights: str = ""                              # pretrained weights: a file, DEFAULT or a torchvision name
    init: str = ""                                 # start from a cnnlab run's best.pt
    freeze_epochs: int = 0                         # train only the head for this many epochs first
    backbone_lr_mult: float = 1.0                  # the backbone's lr = lr x this (discriminative lr)
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    l2: float = 0.0
    schedule: str = "constant"
    step_epochs: int = 0
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    ema: float = 0.0
    lookahead: bool = False                       # airbench's Lookahead: the weights pulled back to a slow copy every 5 steps
    patience: int = 0
    # machinery (seed: in DataConfig)
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True                    # NHWC: faster convolutions on CPU (oneDNN) and GPU
    compile: bool = False
    threads: int = 0
    sync_bn: bool = False
    eval_batch_size: int = 256                     # cache-friendly: 33k vs 6.7k img/s at 1000 (CPU)
    # output
    out: str = ""
    overwrite: bool = False                       # replace an existing run folder instead of refusing
    save_every_steps: int = 0
    log_every: float = 0.0
    tensorboard: bool = False
    report: bool = True
    calibrate: bool = False                       # fit a temperature on the val split after training

    def to_dict(self):
        return dataclasses.asdict(self)

    def data_config(self):
        """The data part alone, for data/ and everything that only loads data."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})


CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("constant", "step", "cosine", "onecycle"),
    "amp": ("auto", "off", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "sampler": ("shuffle", "fixed", "balanced"),
    "on_bad_image": ("error", "skip"),
    "in_memory": ("auto", "yes", "no"),
    "resize": ("auto", "squash", "crop", "pad"),
    "crop_padding_mode": ("zeros", "reflect"),
}
POSITIVE = ("epochs", "batch_size", "lr", "eval_batch_size")
NON_NEGATIVE = ("train_samples", "val_samples", "test_samples", "image_size", "weight_decay", "l2",
                "step_epochs", "warmup_epochs", "label_smoothing", "grad_clip", "patience",
                "threads", "save_every_steps", "log_every", "seed", "augment_magnitude",
                "freeze_epochs", "resize_size", "crop_padding")
# Upper bounds of whole numbers. Every count fits 32 bits (torch and numpy take larger ones badly:
# seed 10**20 overflowed torch.manual_seed); seeds are numpy's range. Images larger than 1024 px a
# side are beyond what cnnlab's in-memory datasets hold (one RGB image is 3 MiB at 1024; an
# image_size of 10**6 asked for 10**12 bytes per image).
MAX_INT = 2**31 - 1
MAXIMUM = {"seed": 2**32 - 1, "image_size": 1024, "augment_magnitude": 30,   # RandAugment's 31 bins
           "resize_size": 1024, "crop_padding": 1023}                      # under the side (data/loader.py)
FIELD_TYPES = {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)}


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_scalar(kind, value):
    """`value` (a YAML value or a CLI string) as bool, int, float or str; ValueError if it is not one.
    Plain bool("false") and int(2.7) would silently give True and 2, so each kind is parsed by hand."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is bool and str(value).strip().lower() in TRUE + FALSE:
        return str(value).strip().lower() in TRUE
    if isinstance(value, bool) or kind is bool:   # True is an int to Python, not a number to a user
        raise ValueError(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int and isinstance(value, (int, str)):
        return int(value)                             # "2.5", "--3" and "²" raise ValueError
    if kind is float and isinstance(value, (int, float, str)):
        number = float(value)
        if math.isfinite(number):                     # nan slips through `< 0` range checks
            return number
    if kind is str and isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(value)


def coerce(key, value):
    """Convert a YAML or CLI value to the field's type, or raise UsageError naming the key."""
    kind = FIELD_TYPES[key]
    if value is None:
        raise UsageError(f"'{key}' needs a value of type {kind.__name__}.")
    if kind in (bool, int, float, str):
        try:
            return parse_scalar(kind, value)
        except (TypeError, ValueError, OverflowError):
            pass
    elif kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    elif kind is dict and isinstance(value, dict):
        return dict(value)
    raise UsageError(f"'{key}' must be of type {kind.__name__}, got {value!r}.")


def validate(cfg):
    """Range and choice checks; returns cfg so calls chain."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise unknown(f"value for '{key}'", getattr(cfg, key), choices)
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise UsageError(f"'{key}' must be positive, got {getattr(cfg, key)}.")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise UsageError(f"'{key}' must not be negative, got {getattr(cfg, key)}.")
    for key in (k for k, kind in FIELD_TYPES.items() if kind is int):
        if getattr(cfg, key) > MAXIMUM.get(key, MAX_INT):
            raise UsageError(f"'{key}' must be at most {MAXIMUM.get(key, MAX_INT)}, got {getattr(cfg, key)}.")
    validate_schedule(cfg)
    validate_augment(cfg)
    if not 0 <= cfg.val_fraction < 1 or not 0 < cfg.test_fraction < 1:
        raise UsageError(f"'val_fraction' must be in [0, 1) and 'test_fraction' in (0, 1), got {cfg.val_fraction:g} and "
                         f"{cfg.test_fraction:g}.")
    if cfg.label_smoothing >= 1:
        raise UsageError(f"'label_smoothing' must be below 1, got {cfg.label_smoothing}.")
    if not 0 <= cfg.ema < 1:
        raise UsageError(f"'ema' is a decay in [0, 1) (e.g. 0.999), got {cfg.ema}.")
    if cfg.ema and cfg.lookahead:   # the EMA would be evaluated and saved, and never see lookahead's last pull
        raise UsageError("'lookahead' and 'ema' both average the weights over steps: give one of them.")
    parse_split_ranges(cfg.split_ranges)
    fixed_normalization(cfg.normalize)
    if cfg.split_ranges and (cfg.train_samples or cfg.val_samples or cfg.test_samples):
        raise UsageError("'split_ranges' gives every split's images itself: drop train_samples, val_samples and "
                         "test_samples.")
    validate_fine_tuning(cfg)
    if cfg.resize_size and not cfg.image_size <= cfg.resize_size:
        raise UsageError(f"'resize_size' ({cfg.resize_size}) is the side images are resized to before the centre "
                         f"crop of 'image_size' ({cfg.image_size}): give an image_size, and a resize_size at least "
                         "as large.")
    if cfg.resize_size and cfg.resize in ("squash", "pad"):
        raise UsageError(f"'resize_size' is the stored side of --resize crop; with --resize {cfg.resize} images are "
                         "resized to image_size directly: drop resize_size, or use --resize crop (or auto).")
    if cfg.amp == "fp16" and cfg.device == "cpu":
        raise UsageError("'amp: fp16' needs CUDA; use 'amp: bf16' or 'off' on the CPU.")
    return cfg


def validate_fine_tuning(cfg):
    """--freeze-epochs and --backbone-lr-mult: a freeze longer than the run never unfreezes."""
    if cfg.freeze_epochs > cfg.epochs:
        raise UsageError(f"'freeze_epochs' ({cfg.freeze_epochs}) must not exceed 'epochs' ({cfg.epochs}): the "
                         "backbone would never be trained; use fewer --freeze-epochs or more --epochs.")
    if not 0 < cfg.backbone_lr_mult <= 10:
        raise UsageError(f"'backbone_lr_mult' must be in (0, 10] (e.g. 0.1: the backbone learns 10x slower than "
                         f"the head), got {cfg.backbone_lr_mult}.")


def fine_tuning_defaults(values, overrides):
    """A run started from pretrained weights (--weights / --init) whose schedule was not given
    trains with one-cycle, as fastai's fine_tune does: the warm-up spares the pretrained features
    the full lr of a new head's first, large gradients."""
    starts_pretrained = overrides.get("weights") or overrides.get("init")
    if starts_pretrained and "schedule" not in overrides and values["schedule"] == "constant":
        values["schedule"] = "onecycle"


def validate_schedule(cfg):
    """The optimizer and schedule settings whose wrong values train silently: a negative gamma
    makes the LR negative (gradient ascent), momentum 5 or a warm-up longer than the run freeze it."""
    if not 0 <= cfg.momentum < 1:
        raise UsageError(f"'momentum' must be in [0, 1) (e.g. 0.9), got {cfg.momentum}.")
    if not 0 < cfg.gamma <= 1:
        raise UsageError(f"'gamma' multiplies the LR every 'step_epochs': it must be in (0, 1] (e.g. 0.1), "
                         f"got {cfg.gamma}.")
    if cfg.warmup_epochs > cfg.epochs:
        raise UsageError(f"'warmup_epochs' ({cfg.warmup_epochs:g}) must not exceed 'epochs' ({cfg.epochs}): the LR "
                         "would never reach its peak.")
    if cfg.schedule == "step" and cfg.step_epochs == 0:
        raise UsageError("'schedule: step' needs 'step_epochs' (divide the LR by 1/gamma every N epochs).")


def ignored_settings(cfg):
    """Notes on settings this run's other choices leave without effect (a run that took them would
    otherwise say nothing): SGD's momentum and Nesterov under Adam, the step schedule's settings
    under another schedule, Nesterov without momentum, crop's padding without crop or with
    --resize crop's random-resized crops."""
    notes = []
    sgd_only = ([f"--momentum {cfg.momentum:g}"] if cfg.momentum != TrainConfig.momentum else []) + (
        ["--nesterov"] if cfg.nesterov else [])
    if cfg.optimizer != "sgd" and sgd_only:
        notes.append(acting_only(sgd_only, "--optimizer sgd", cfg.optimizer))
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        notes.append("--nesterov needs --momentum above 0; this run is plain SGD.")
    step_only = [f"--{k.replace('_', '-')} {getattr(cfg, k):g}" for k in ("step_epochs", "gamma")
                 if getattr(cfg, k) != getattr(TrainConfig, k)]
    if cfg.schedule != "step" and step_only:
        notes.append(acting_only(step_only, "--schedule step", cfg.schedule))
    crop_only = ([f"--crop-padding {cfg.crop_padding}"] if cfg.crop_padding else []) + (
        [f"--crop-padding-mode {cfg.crop_padding_mode}"] if cfg.crop_padding_mode != "zeros" else [])
    crops = cfg.augment in ("auto", "randaugment", "trivialaugment") or "crop" in cfg.augment.split("+")
    if crop_only and cfg.resize == "crop" and cfg.image_size:   # photos stored larger than the input (data/photos.py)
        notes.append(acting_only(crop_only, "the shifts of --augment crop", "--resize crop (random-resized crops)"))
    elif crop_only and not crops:   # (auto and a policy alone take the dataset's crop)
        notes.append(acting_only(crop_only, "--augment crop", f"--augment {cfg.augment}"))
    return notes


def acting_only(flags, where, chosen):
    """'--a 1 and --b act on WHERE only; CHOSEN ignores them.' (one flag: 'acts', 'it')."""
    many = len(flags) > 1
    return (f"{' and '.join(flags)} {'act' if many else 'acts'} on {where} only; "
            f"{chosen} ignores {'them' if many else 'it'}.")


def parse_split_ranges(text):
    """'train=0:20000,val=20000:25000,test=0:5000' -> {'train': (0, 20000), ...}; {} for ''. Every
    split must be named once (an empty range, e.g. val=0:0, turns a split off)."""
    if not text:
        return {}
    example = "e.g. train=0:20000,val=20000:25000,test=0:5000"
    ranges = {}
    for part in text.split(","):
        name, _, span = part.strip().partition("=")
        start, _, stop = span.partition(":")
        try:
            start, stop = int(start), int(stop)
        except ValueError:
            raise UsageError(f"'split_ranges' part {part.strip()!r} is not SPLIT=START:STOP ({example}).") from None
        if name not in ("train", "val", "test") or name in ranges:
            raise UsageError(f"'split_ranges' names train, val and test once each, got {name!r} ({example}).")
        if not 0 <= start <= stop:
            raise UsageError(f"'split_ranges' range {name}={start}:{stop} must have 0 <= START <= STOP.")
        ranges[name] = (start, stop)
    if len(ranges) != 3:
        raise UsageError(f"'split_ranges' must give train, val and test ({example}); missing "
                         f"{', '.join(s for s in ('train', 'val', 'test') if s not in ranges)}.")
    if ranges["train"][0] == ranges["train"][1]:
        raise UsageError("'split_ranges' gives the train split no images.")
    return ranges


def fixed_normalization(text):
    """None for 'dataset' (the training split's statistics), else (means, stds): 'none' is (0, 1)
    (pixels / 255), 'M,S' one pair for every channel, 'M1,M2,M3,S1,S2,S3' one per channel."""
    if text == "dataset":
        return None
    if text == "none":
        return [0.0], [1.0]
    usage = (f"'normalize' is dataset, none, MEAN,STD or one mean per channel then one std per channel "
             f"(e.g. 0.5,0.5), got {text!r}.")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(usage) from None
    if len(values) % 2 or not values or not all(math.isfinite(v) for v in values):
        raise UsageError(usage)
    means, stds = values[:len(values) // 2], values[len(values) // 2:]
    if min(stds) <= 0:
        raise UsageError(f"'normalize' stds must be positive, got {text!r}.")
    return means, stds


AUGMENT_PARTS = ("crop", "flip", "altflip", "randaugment", "trivialaugment")
TTA_MODES = ("none", "flip", "flip+crop")   # evaluate/predict/serve --tta (data/augment.py tta_views)


def validate_augment(cfg):
    """--augment's parts, the augmentation strengths and --class-weights' form (its length is checked
    against the data's classes when they are known, training/loop.py)."""
    parts = cfg.augment.split("+")
    if cfg.augment not in ("auto", "none"):
        for part in parts:
            if part not in AUGMENT_PARTS:
                raise unknown("part of 'augment'", part, ("auto", "none") + AUGMENT_PARTS)
        for pair in (("randaugment", "trivialaugment"), ("flip", "altflip")):
            if pair[0] in parts and pair[1] in parts:
                raise UsageError(f"'augment' takes one of {pair[0]} and {pair[1]}, not both.")
    for key in ("jitter", "erase"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UsageError(f"'{key}' must be in [0, 1], got {getattr(cfg, key)}.")
    for key in ("mixup", "cutmix"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"'{key}' is a Beta distribution's alpha: 0 (off) or positive (e.g. 0.2), got {getattr(cfg, key)}.")
    class_weight_values(cfg.class_weights)


def class_weight_values(text):
    """--class-weights as a list of floats, or the word (none, auto)."""
    if text in ("none", "auto"):
        return text
    try:
        values = [parse_scalar(float, v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values) or not any(v > 0 for v in values):
        raise UsageError(f"'class_weights' must be none, auto or one non-negative number per class (e.g. 1,1,5), "
                         f"got {text!r}.")
    return values


def make_config(overrides=None, base=None):
    """A validated TrainConfig from a dict of overrides on top of `base` (or the defaults)."""
    values = (base or TrainConfig()).to_dict()
    for key, value in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise unknown("configuration key", key, FIELD_TYPES)
        values[key] = coerce(key, value)
    fine_tuning_defaults(values, overrides or {})
    return validate(TrainConfig(**values))


def load_yaml(path):
    """The dict in a YAML recipe file; errors name the file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file (not UTF-8): a config is a YAML file of settings.") from None
    except OSError as e:   # a folder, no permission
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}.") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of settings, got {type(values).__name__}.")
    return values


def dump_yaml(cfg, path):
    """Write a config (or a dict) as YAML, atomically: a resumed run rewrites its config.yaml."""
    import yaml

    from .atomic import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, sort_keys=False))
