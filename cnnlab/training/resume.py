"""Which config a run trains with, and the resume policy: `--resume RUN` continues the saved
config, with only the settings that do not change what the run IS allowed to differ."""
import os

from ..config import load_yaml, make_config
from ..data.registry import path_source
from ..errors import UsageError
from .checkpoint import DEFINING
from .finetune import weights_sizes
from .run_folder import lock_holder

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
        holder = lock_holder(run_dir) if os.path.isdir(run_dir) else None
        if holder:   # its first epoch is not over yet
            raise UsageError(f"cannot resume {run_dir}: another cnnlab process (pid {holder}) is training it and has "
                             "written no last.pt yet; wait for it to finish, or stop it (Ctrl-C writes last.pt) "
                             "and resume then.")
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
    saved, overrides = moved_data(saved, overrides, run_dir)
    changed = [k for k in MUST_MATCH if k in overrides and make_config({k: overrides[k]}).to_dict()[k] != getattr(saved, k)]
    if changed:
        diffs = ", ".join(f"{k}: {getattr(saved, k)!r} -> {overrides[k]!r}" for k in changed)
        hint = " (or, for the same data moved, give its new place with --data-dir PATH)" if (
            "data" in changed and path_source(saved.data)) else ""
        raise UsageError(f"cannot resume {run_dir} with a different {diffs}; start a new run instead{hint}.")
    return make_config({k: v for k, v in overrides.items() if k != "out"}, base=saved)


def moved_data(saved, overrides, run_dir):
    """(saved config, overrides) for a run trained on a folder, labels file or .npz: with --data-dir,
    the data's new place (as `cnnlab evaluate` takes it; the saved split's fingerprint still
    refuses other data); without it, a path not found from here says how to give it."""
    kind = path_source(saved.data)
    if not kind:
        return saved, overrides
    if overrides.get("data_dir"):
        rest = {k: v for k, v in overrides.items() if k != "data_dir"}
        return make_config({"data": f"{kind}:{overrides['data_dir']}"}, base=saved), rest
    where = saved.data.partition(":")[2]
    if "data" not in overrides and not os.path.exists(where):
        relative = "" if os.path.isabs(where) else " (a path relative to the folder the run was trained from)"
        raise UsageError(f"cannot resume {run_dir}: its data {where}{relative} is not found from here; give the "
                         "data's place with --data-dir PATH.")
    return saved, overrides
