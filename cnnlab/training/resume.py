"""Which config a run trains with, and the resume policy: `--resume RUN` continues the saved
config, with only the settings that do not change what the run IS allowed to differ."""
import os

from ..config import load_yaml, make_config
from ..errors import UsageError
from .checkpoint import DEFINING
from .finetune import weights_sizes

# Settings that define what a run IS; changing them on --resume would silently mix two runs: its
# data and network (checkpoint.DEFINING) and how it trains.
MUST_MATCH = DEFINING + ("batch_size", "optimizer", "augment", "crop_padding", "crop_padding_mode",
                         "augment_magnitude", "jitter", "erase", "mixup", "cutmix", "class_weights", "sampler")


# Settings that act only on training steps: resumed into a run whose epochs are all trained, a new
# value would change nothing but what config.yaml says the run was trained with.
STEP_ONLY = ("lr", "schedule", "warmup_epochs", "step_epochs", "gamma", "momentum", "nesterov", "weight_decay",
             "l2", "label_smoothing", "grad_clip", "ema", "lookahead", "freeze_epochs", "backbone_lr_mult", "patience",
             "save_every_steps")


def refuse_changes_to_trained_run(saved, cfg, epochs_done, run_dir):
    """UsageError for a --resume that changes a STEP_ONLY setting of a run with no epoch left to train
    (`saved`: the checkpoint's config dict); a plain --resume of it still re-tests and re-reports."""
    if epochs_done < cfg.epochs:
        return
    changed = [k for k in STEP_ONLY if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise UsageError(f"cannot resume {run_dir} with {diffs}: its training finished at epoch {epochs_done}, so "
                         f"the new setting would train nothing. Add --epochs N (more than {epochs_done}) to train on "
                         "with it, or start a new run.")


def resolve_config(config=None, resume=None, overrides=None):
    """The TrainConfig to train with: with `resume` (a run folder) its saved config plus the allowed
    `overrides`; otherwise `config` (a TrainConfig, or None for the defaults) with `overrides` applied."""
    overrides = overrides or {}
    if resume:
        return resume_config(resume, overrides)
    cfg = make_config(overrides, base=config) if config is None or overrides else config
    return weights_sizes(with_data_name(cfg))


def with_data_name(cfg):
    """A bare path as `data` (from a flag, a recipe or Python) stored as the registry names it,
    folder:PATH or npz:PATH, so run names, config.yaml and evaluate all see one form."""
    from ..data import resolve_name

    name = resolve_name(cfg.data)
    return cfg if name == cfg.data else make_config({"data": name}, base=cfg)


def resume_config(run_dir, overrides):
    """The saved config with the allowed overrides applied; refuses changes to MUST_MATCH keys."""
    if not os.path.exists(os.path.join(run_dir, "last.pt")):
        raise UsageError(f"cannot resume: {run_dir} has no last.pt (is it a cnnlab run folder?).")
    out = overrides.get("out")
    if out and os.path.realpath(out) != os.path.realpath(run_dir):   # was ignored silently
        raise UsageError(f"--out {out} is not the run being resumed: a resumed run continues in its own folder "
                         f"{run_dir}; drop --out (or copy the folder and resume the copy).")
    path = os.path.join(run_dir, "config.yaml")
    values = load_yaml(path)
    try:
        saved = make_config(values)
    except UsageError as e:   # an edited or damaged config.yaml: say which file the bad setting is in
        raise UsageError(f"{path}: {e}") from None
    changed = [k for k in MUST_MATCH if k in overrides and make_config({k: overrides[k]}).to_dict()[k] != getattr(saved, k)]
    if changed:
        diffs = ", ".join(f"{k}: {getattr(saved, k)!r} -> {overrides[k]!r}" for k in changed)
        raise UsageError(f"cannot resume {run_dir} with a different {diffs}; start a new run instead.")
    return make_config({k: v for k, v in overrides.items() if k != "out"}, base=saved)
