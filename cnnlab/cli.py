"""The command line: the only module that reads argv. Heavy imports (torch, matplotlib) happen
inside the command functions so `cnnlab --help` stays fast."""
import argparse
import dataclasses
import json
import os
import sys

from . import __version__
from .config import TTA_MODES
from .errors import CnnlabError, UsageError, unknown

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")

HELP = {
    "data": "dataset: a name from `cnnlab datasets` (default mnist-5k, embedded), e.g. cifar10, npz:PATH, "
            "folder:PATH, or just the path of an image folder or .npz file",
    "data_dir": "root folder of torchvision-style datasets (default: data)",
    "classes": "keep only these classes, comma-separated names or indices (e.g. airplane,bird)",
    "class_names": "comma-separated names for data that carries none (an npz without a `classes` array)",
    "model": "network name (see `cnnlab models`; default mnist_cnn, seed 003's CNN)",
    "batch_size": "GLOBAL batch size: under DDP each of N processes takes batch_size/N",
    "augment": "auto (crop for digits, crop+flip for photos), none, or parts joined by +: crop, flip, randaugment or "
               "trivialaugment (e.g. crop+flip+randaugment); altflip instead of flip mirrors each image in every other "
               "epoch (airbench's alternating flip: a fixed random half in even epochs, the other half in odd ones)",
    "crop_padding": "crop's random shifts go up to this many pixels; 0 = auto: 2 for digits, a side/8 above [default: 0]",
    "crop_padding_mode": "the border crop's shifts uncover: zeros, or reflect (the image mirrored, as airbench) "
                         "[default: zeros]",
    "augment_magnitude": "RandAugment's strength, 0-30 [default: 9]",
    "jitter": "colour jitter: brightness, contrast and saturation scaled by U(1-J, 1+J), e.g. 0.4 [default: 0]",
    "erase": "random erasing: probability that an image gets a blanked box, e.g. 0.25 [default: 0]",
    "mixup": "mixup's Beta alpha, e.g. 0.2 (soft targets); 0 = off [default: 0]",
    "cutmix": "cutmix's Beta alpha, e.g. 1.0; with --mixup each batch takes one of the two [default: 0]",
    "class_weights": "loss weight per class: none, auto (inverse class frequency) or w1,w2,... [default: none]",
    "sampler": "shuffle (a new order each epoch); fixed: one seeded order reused every epoch (seed 002's book runs); "
               "balanced: every class drawn equally often (seeded; with replacement) [default: shuffle]",
    "lr": "peak learning rate",
    "l2": "seed 002's explicit L2 penalty l2*sum(w^2) added to the loss (differs from --weight-decay for Adam)",
    "weight_decay": "the optimizer's weight decay (decoupled for adamw)",
    "schedule": "constant, step (x gamma every --step-epochs), cosine, onecycle",
    "calibrate": "after training, fit a temperature on the validation split (calibrated probabilities; stored in best.pt, applied by evaluate, predict, serve and export)",
    "ema": "keep an exponential moving average of the weights with this decay (e.g. 0.999); it is what is evaluated and saved",
    "lookahead": "airbench's Lookahead: every 5 steps the weights move back toward a slow copy, more and more "
                 "as training ends (decay 0.95^5 x progress^3), and the run ends on the slow copy",
    "amp": "auto (bf16 on CUDA, off on CPU), off, bf16 (also fast on CPUs with AMX or AVX512-BF16), fp16",
    "patience": "early stopping: stop after this many epochs without a better val accuracy (0 = off)",
    "save_every_steps": "also write last.pt every N steps inside epochs",
    "log_every": "print loss and elapsed time every fraction of an epoch (e.g. 0.25)",
    "out": "run folder (default runs/<model>-<data>-<time>); an existing run there is refused",
    "overwrite": "replace the run already in --out (its files are deleted first) instead of refusing",
    "device": "auto, cpu or cuda",
    "split_ranges": "index ranges in the data's own order instead of random splits, e.g. "
                    "train=0:20000,val=20000:25000,test=0:5000 (seed 004); test indexes the official test set",
    "normalize": "dataset (the training split's mean/std, default), none (pixels/255, ToTensor only), or MEAN,STD "
                 "(one pair, e.g. 0.5,0.5) or C means then C stds",
    "weights": "pretrained weights: a state_dict file (.pth/.pt, read with weights_only=True, or .safetensors), "
               "or for tv/ models DEFAULT or a torchvision weights name (IMAGENET1K_V1); default schedule becomes onecycle",
    "init": "start from a cnnlab run's best.pt (RUN_DIR or file); the head is re-made when the classes differ",
    "freeze_epochs": "train only the head for this many epochs (backbone frozen, batch norm in eval mode), then all",
    "backbone_lr_mult": "the backbone's lr is --lr times this (e.g. 0.1), the head's is --lr",
    "cache_dir": "where folder: and csv: images are cached once decoded (default: $CNNLAB_CACHE or ~/.cache/cnnlab)",
    "in_memory": "auto (splits in memory when they fit half the memory available, else streamed from the disk "
                 "cache), yes or no [default: auto]",
    "fix_list": "a fix list CSV from `cnnlab audit --fix-list` (edited): images whose action is exclude are left "
                "out of every split, relabel ones get the class in `suggested`",
    "resize": "how images become --image-size squares: crop (photos: stored at ~1.15x, random-resized-crop to train, "
              "resize + centre crop to evaluate), squash (stretched), pad (letterboxed in black), or auto: crop for "
              "folders of images larger than --image-size, squash otherwise [default: auto]",
    "resize_size": "with --resize crop: images are stored at and resized (shorter side) to this before the centre crop "
                   "of --image-size (default: about 1.15x --image-size, or the torchvision weights' own, 256 for 224)",
    "threads": "torch's CPU threads; 0 = automatic: every CPU, with OpenMP's idle threads sleeping instead of spinning "
               "(robust when other processes load the machine); OMP_NUM_THREADS and OMP_WAIT_POLICY are honoured [default: 0]",
}


RUN_DATA_DIR_HELP = ("where the run's data is now: the folder holding torchvision-style datasets, or for a run "
                     "on a folder, labels file or .npz that data's new location (default: where it was trained)")
TTA_HELP = ("test-time augmentation: average the probabilities of the image and its mirror image (flip), and of "
            "shifts of both by the training crop's padding (flip+crop)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_train_flags(p):
    from .config import FIELD_TYPES, TrainConfig

    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = HELP.get(f.name, "") + (f" [default: {default}]" if f.name not in HELP or "default" not in HELP[f.name] else "")
        if FIELD_TYPES[f.name] is bool:
            p.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, metavar="BOOL", help=text)
        elif f.name == "model_args":
            p.add_argument("--model-arg", dest="model_args", action="append", default=None, metavar="KEY=VALUE",
                           help="a model knob, e.g. n_chans1=64 or n_blocks=20 (repeatable)")
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=text)
    p.add_argument("--config", type=recipe_path, metavar="RECIPE|FILE",
                   help="a recipe name (see `cnnlab recipes`, e.g. seed003_mnist) or a YAML file; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.pt, exactly")
    p.add_argument("--nproc", type=int, default=0, help="launch N processes with torchrun on this machine (DDP)")


def recipe_names():
    return sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml"))


def recipe_path(value):
    """--config: a YAML file, or the name of a recipe shipped inside cnnlab (so it works from any
    folder); `recipes/NAME.yaml`, the old in-repo path, still finds the shipped recipe."""
    if os.path.isfile(value):
        return value
    name = os.path.basename(value)[:-5] if value.endswith(".yaml") else value
    if name in recipe_names() and os.path.dirname(value) in ("", "recipes"):
        return os.path.join(RECIPES, name + ".yaml")
    if os.sep in value or value.endswith((".yaml", ".yml")):
        raise UsageError(f"config file not found: {value} (recipes by name: see `cnnlab recipes`).")
    raise unknown("recipe", value, recipe_names())


def recipe_description(name):
    """The first line of the recipe's leading comment."""
    with open(os.path.join(RECIPES, name + ".yaml"), encoding="utf-8") as f:
        first = f.readline()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def train_overrides(args):
    """Flags the user actually gave (argparse defaults are None), as config keys."""
    from .config import FIELD_TYPES

    given = {k: v for k, v in vars(args).items() if k in FIELD_TYPES and v is not None}
    if "model_args" in given:
        pairs = {}
        for item in given["model_args"]:
            if "=" not in item:
                raise UsageError(f"--model-arg takes KEY=VALUE, got '{item}'.")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value.strip()
        given["model_args"] = pairs
    return given


def cmd_train(args):
    from .config import load_yaml, make_config

    overrides = train_overrides(args)
    if args.nproc:
        from .training.distributed import launch

        return launch(args.nproc, args.argv)
    from .api import train

    if args.resume:
        if args.config:
            raise UsageError("--resume takes the run's own config; drop --config.")
        train(resume=args.resume, **overrides)
        return 0
    base = make_config(load_yaml(args.config)) if args.config else None
    train(make_config(overrides, base=base))
    return 0


def cmd_evaluate(args):
    from .evaluation.results import evaluate_model, last_epoch, load_trained, run_data

    model, run_dir = load_trained(args.run)
    data = run_data(model, run_dir, args.data, args.data_dir)
    m = evaluate_model(model, data, args.split, tta=args.tta)
    last = last_epoch(args.run, model)
    if last:   # the figure the tutorials print: the last epoch's weights, beside the best epoch's
        final = evaluate_model(last, data, args.split, tta=args.tta, say_tta=False)
        m["final"] = {"epoch": last.epoch, "accuracy": final["accuracy"], "loss": final["loss"]}
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{args.split}: {m['samples']} images  loss {m['loss']:.4f}  accuracy {m['accuracy']:.2%}"
          f"  balanced {m['balanced_acc']:.2%}" + (f"  (tta {args.tta})" if args.tta != "none" else "")
          + (f"  top-5 {m['top5_accuracy']:.2%}" if m.get("top5_accuracy") is not None else "")
          + f"  ECE {m['ece']:.2%}")
    if "final" in m:
        print(f"{args.split}, last epoch ({m['final']['epoch']}, last.pt): loss {m['final']['loss']:.4f}  "
              f"accuracy {m['final']['accuracy']:.2%}")
    width = max([len(r["class"]) for r in m["per_class"]] + [len("weighted avg")])
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for r in m["per_class"]:
        print(f"{r['class']:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  {r['support']:7d}")
    for name in ("macro_avg", "weighted_avg"):
        a = m[name]
        print(f"{name.replace('_', ' '):<{width}}  {a['precision']:9.3f}  {a['recall']:6.3f}  {a['f1']:5.3f}")
    return 0


def cmd_report(args):
    from .evaluation.results import evaluate_model, load_trained, run_data
    from .evaluation.report import write_report

    if not os.path.isdir(args.run):   # the report reads the run's metrics.csv and summary.json too
        found = f"{args.run} is a file" if os.path.exists(args.run) else f"run folder not found: {args.run}"
        raise CnnlabError(f"{found}; report takes a run folder (as evaluate and predict find them).")
    model, run_dir = load_trained(args.run)
    data = run_data(model, run_dir, data_dir=args.data_dir)
    write_report(run_dir, data, evaluate_model(model, data, "test", collect=True), model.config, net=model.net)
    return 0


def cmd_compare(args):
    from .evaluation.compare import compare, compare_table

    rows, picture = compare(args.runs, args.out)
    print("\n".join(compare_table(rows)))
    print(f"validation curves: {picture}", file=sys.stderr)   # stdout stays the table alone
    return 0


def cmd_predict(args):
    from .deploy.predict import predict_files

    return predict_files(args.checkpoint, args.paths, top_k=args.top_k, as_json=args.json, invert=args.invert,
                         backend=args.backend, tta=args.tta)


def cmd_export(args):
    from .deploy.export import export

    export(args.checkpoint, args.format, args.out, raw_input=args.raw_input, probabilities=args.probabilities,
           quantize=args.quantize, max_drop=args.max_drop)
    return 0


def cmd_serve(args):
    from .deploy.serve import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("CNNLAB_API_KEY")
    serve(args.checkpoint, host=args.host, port=args.port, top_k=args.top_k, max_bytes=args.max_bytes,
          max_pixels=args.max_pixels, timeout=args.timeout, api_key=api_key, docs=args.docs, backend=args.backend,
          max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000, tta=args.tta)
    return 0


def cmd_explain(args):
    from .deploy.explain import explain
    from .deploy.predict import expand

    files = expand(args.images)   # folders walked once, here
    results = explain(args.run, files, target=args.target, layer=args.layer, out=args.out, invert=args.invert,
                      quiet=False)
    return 1 if len(results) < len(files) else 0   # as predict: some file could not be read


def cmd_audit(args):
    from .evaluation.audit import audit, summary_lines

    report = audit(args.data, data_dir=args.data_dir, out=args.out, folds=args.folds, epochs=args.epochs,
                   model=args.model, seed=args.seed, device=args.device, labels=not args.no_labels,
                   fix_list=args.fix_list, limit=args.limit)
    print("\n".join(summary_lines(report)))
    print(f"wrote {os.path.join(report['out'], 'audit.html')} and audit.json"
          + (f"; fix list: {args.fix_list}" if args.fix_list else ""))
    return 0


def cmd_models(args):
    from .models.zoo import describe_model, list_backbones, list_models

    if args.family:
        print(list_backbones(args.family, args.data, args.data_dir, args.image_size, args.name or ""))
    elif args.name:
        print(describe_model(args.name, args.data, args.data_dir))
    else:
        print(list_models(args.data, args.data_dir))
    return 0


def cmd_datasets(args):
    from .data import datasets

    print(f"{'name':<22} {'shape':<12} {'classes':<8} {'train / test':<15} description")
    for d in datasets():
        print(f"{d.usage:<22} {d.shape:<12} {str(d.classes):<8} {d.sizes:<15} {d.description}")
    return 0


def cmd_recipes(args):
    names = recipe_names()
    width = max(map(len, names))
    print(f"{'recipe':<{width}}  description")
    for name in names:
        print(f"{name:<{width}}  {recipe_description(name)}")
    return 0


def cmd_data_check(args):
    from .data.check import check

    return check(args.data, args.data_dir, cache_dir=args.cache_dir, in_memory=args.in_memory)


def cmd_cache(args):
    """`cnnlab cache list|clear`: the decoded-images cache, entry by entry, and its size."""
    from .data.cache import cache_root, clear, entries, small_entries

    root = cache_root(args.cache_dir)
    if args.cache_command == "clear":
        print(f"freed {clear(root) / 2**20:,.1f} MiB in {root}")
        return 0
    found, other = entries(root)
    small = small_entries(root)
    print(f"{root}: {len(found)} entries" + (f", and {sum(n for n, _ in small.values())} small ones" if small else ""))
    for kind, entry in found:
        n, *shape = entry.shape
        print(f"  {kind:<8} {os.path.basename(entry.path)}  {n:>8,} x {'x'.join(map(str, shape)):<10} "
              f"{entry.nbytes / 2**20:>10,.1f} MiB  {entry.meta.get('source', '')}")
    what = {"sets": "decoded datasets (MNIST, CIFAR, ... as arrays)", "formats": "image folders' formats",
            "folders": "small decoded folders"}
    for kind, (n, size) in small.items():
        print(f"  {kind:<8} {n:>6,} {what[kind]:<48} {size / 2**20:>10,.1f} MiB")
    total = sum(entry.nbytes for _, entry in found) + sum(size for _, size in small.values()) + other
    print(f"total {total / 2**20:,.1f} MiB" + (f" ({other / 2**20:,.1f} MiB of it locks and unfinished builds)"
                                                if other else ""))
    return 0


def cmd_lr_find(args):
    from .config import load_yaml, make_config
    from .evaluation.plots import save_lr_find
    from .training.lr_find import default_plot_path, lr_find
    from .training.resume import with_data_name

    # Flags that shape a training run but have no meaning for the range test (one process, its own
    # lr sweep, 100 steps): refused rather than silently ignored. Recipe keys are fine.
    unused = ("resume", "nproc", "epochs", "lr", "schedule", "warmup_epochs", "step_epochs", "gamma", "patience",
              "ema", "lookahead", "save_every_steps", "log_every", "tensorboard")
    given = [name for name in unused if getattr(args, name, None) not in (None, 0)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"lr-find does not use {flag} (it runs 100 steps on one process, sweeping the lr from "
                         f"1e-7 to 10); drop {flag}, or give it to `cnnlab train`.")
    if (args.out or "").lower().endswith((".png", ".jpg", ".jpeg", ".svg", ".pdf")):   # made a folder of that name
        raise UsageError(f"--out {args.out} names a folder for lr-find (the run it prepares; the plot goes inside it): "
                         f"give the picture's own name with --plot {args.out}.")
    base = make_config(load_yaml(args.config)) if args.config else None
    cfg = with_data_name(make_config(train_overrides(args), base=base))
    out = args.plot or default_plot_path(cfg)
    try:   # before the 100 steps, not after them
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder of the plot {out} ({e.strerror or e}: {e.filename}); "
                         "choose another --plot.") from None
    curve = lr_find(cfg)
    save_lr_find(curve.lrs, curve.losses, curve.suggestion, out, minimum=curve.minimum)
    (lowest_lr, lowest_loss), lrs = curve.minimum, curve.lrs
    print(f"lr-find: {len(lrs)} steps from {lrs[0]:.1e} to {lrs[-1]:.1e}; lowest smoothed loss {lowest_loss:.4f} "
          f"at lr {lowest_lr:.2e}; plot: {out}", file=sys.stderr)
    print(f"suggested lr {curve.suggestion:.2e} (a tenth of the lr at the lowest loss)")
    return 0


def cmd_tune(args):
    from .tuning import tune

    try:
        result = tune(args.config, args.space, trials=args.trials, timeout=args.timeout, out=args.out,
                      storage=args.storage, study=args.study, pruner=args.pruner)
    except KeyboardInterrupt:
        print("cnnlab: tune interrupted; the study keeps every finished trial. Resume with the same command"
              + ("" if args.out else " and --out set to the tune folder named above") + ".", file=sys.stderr)
        return 130
    print("\n".join(result.lines))
    return 0


def add_backend_flag(p):
    p.add_argument("--backend", choices=("torch", "onnx"), help="torch: the checkpoint in PyTorch; onnx: ONNX Runtime, on an "
                   "exported .onnx file or the checkpoint exported on the fly (default: onnx for an .onnx file, else torch)")


def build_parser():
    p = Parser(prog="cnnlab", description="Train, evaluate, explain and export CNN image classifiers.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    t = sub.add_parser("train", help="train a model (no arguments: seed 003's CNN on embedded MNIST)")
    add_train_flags(t)
    t.set_defaults(fn=cmd_train, argv=None)
    e = sub.add_parser("evaluate", help="metrics of a run or checkpoint on its test (or val) split")
    e.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    e.add_argument("--data", help="evaluate on another dataset instead of the run's own")
    e.add_argument("--data-dir", help=RUN_DATA_DIR_HELP)
    e.add_argument("--split", default="test", choices=("val", "test"))
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--tta", default="none", choices=TTA_MODES, help=TTA_HELP)
    e.set_defaults(fn=cmd_evaluate)
    r = sub.add_parser("report", help="write the pictures and report.html of a run folder")
    r.add_argument("run", metavar="RUN_DIR")
    r.add_argument("--data-dir", help=RUN_DATA_DIR_HELP)
    r.set_defaults(fn=cmd_report)
    c = sub.add_parser("compare", help="compare runs: a table and overlaid validation curves")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--out", help="where to write the overlay plot "
                   "(default: compare.png in the runs' common parent folder)")
    c.set_defaults(fn=cmd_compare)
    pr = sub.add_parser("predict", help="classify image files and folders")
    pr.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR|ONNX")
    pr.add_argument("paths", nargs="+", metavar="PATH")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--invert", action="store_true", help="invert images (dark digits on light paper)")
    pr.add_argument("--tta", default="none", choices=TTA_MODES, help=TTA_HELP)
    add_backend_flag(pr)
    pr.set_defaults(fn=cmd_predict)
    ex = sub.add_parser("export", help="export to ONNX or TorchScript and verify against PyTorch")
    ex.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    ex.add_argument("--out", help="output file (default: beside the checkpoint)")
    ex.add_argument("--raw-input", action="store_true", help="ONNX takes uint8 images (N, H, W, C) at the model's "
                    "size and converts and normalises them inside (with the checkpoint's invert and channels)")
    ex.add_argument("--probabilities", action="store_true", help="ONNX ends with a softmax: probabilities, not logits")
    ex.add_argument("--quantize", choices=("int8",), help="ONNX Runtime static int8 quantization, calibrated on "
                    "320 seeded training images and checked on the run's test split in the same command")
    ex.add_argument("--max-drop", type=float, default=1.0, help="with --quantize: refuse to write when int8 loses "
                    "more than this many points of test accuracy (default 1)")
    ex.set_defaults(fn=cmd_export)
    s = sub.add_parser("serve", help="an HTTP prediction API and a drawing page")
    s.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR|ONNX")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; any but loopback (0.0.0.0) opens "
                   "the API to the network: use --api-key")
    s.add_argument("--port", type=int, default=8000,
                   help="port to listen on, checked before the model loads (0: any free port)")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--max-bytes", type=int, default=5 * 2**20, help="request size cap, enforced while the body "
                   "streams in (413 above it)")
    s.add_argument("--max-pixels", type=int, help="pixels an uploaded image may decode to (400 above it; "
                   "default: (16 x the model's input side)^2, at least 2048x2048)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds a client has to send a request's "
                   "headers, and again its body (408), before its connection is dropped")
    s.add_argument("--api-key", help="require this key on /predict and /model (Authorization: Bearer KEY or "
                   "X-API-Key: KEY; the page asks for it once); default: the CNNLAB_API_KEY environment variable, "
                   "better than the flag, which other users of this machine can read in `ps`")
    s.add_argument("--max-batch", type=int, default=32, help="images of concurrent requests classified in one "
                   "forward pass: those that queued while the model was busy; 1: each request alone")
    s.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long the first image of a batch waits "
                   "for others (default 0: only what already queued; a window pays off when the model is slow)")
    s.add_argument("--tta", default="none", choices=TTA_MODES, help=TTA_HELP)
    s.add_argument("--docs", action="store_true", help="serve FastAPI's /docs, /redoc and /openapi.json")
    add_backend_flag(s)
    s.set_defaults(fn=cmd_serve)
    xp = sub.add_parser("explain", help="Grad-CAM heatmaps: where the model looked (a PNG per image + a contact sheet)")
    xp.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    xp.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    xp.add_argument("--target", metavar="CLASS", help="explain this class (default: each image's top-1)")
    xp.add_argument("--layer", help="the module to attribute to, a name from the model (default: its last "
                    "spatial feature map, found automatically)")
    xp.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/explain)")
    xp.add_argument("--invert", action="store_true", help="invert images (dark digits on light paper)")
    xp.set_defaults(fn=cmd_explain)
    au = sub.add_parser("audit", help="check a dataset: suspect labels (k-fold + cleanlab), duplicates and leaks "
                        "across splits, odd images, class balance; audit.html + audit.json")
    au.add_argument("data", help="a --data name: mnist-5k, npz:PATH, folder:PATH, ...")
    au.add_argument("--data-dir", default="data")
    au.add_argument("--out", help="folder for audit.html and audit.json (default: audits/<data>)")
    au.add_argument("--folds", type=int, default=4, help="k of the k-fold cross-training [default: 4]")
    au.add_argument("--epochs", type=int, default=3, help="epochs of each fold's fast recipe [default: 3]")
    au.add_argument("--model", help="the fold model (default: digits_fast for grayscale, resnet_small width 16 "
                    "for colour)")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--device", default="cpu", help="cpu or cuda for the folds' training")
    au.add_argument("--no-labels", action="store_true", help="skip the label check and outliers (no training)")
    au.add_argument("--fix-list", metavar="CSV", help="write every finding as a CSV to edit (action: exclude, "
                    "relabel to the class in `suggested`, keep) and feed back with `cnnlab train --fix-list CSV`")
    au.add_argument("--limit", type=int, default=0, help="audit a seeded sample of at most N images of each split "
                    "(a quick look) [default: 0, all]")
    au.set_defaults(fn=cmd_audit)
    m = sub.add_parser("models", help="list the model zoo, or summarise one model layer by layer")
    m.add_argument("name", nargs="?")
    m.add_argument("--data", default="mnist-5k", help="dataset whose input shape to use")
    m.add_argument("--data-dir", default="data")
    m.add_argument("--family", choices=("torchvision", "timm"), help="list a family of published networks "
                   "(--model tv/NAME, timm/NAME) with parameters and FLOPs; NAME then filters the names")
    m.add_argument("--image-size", type=int, default=0, help="with --family: count FLOPs at this side "
                   "(default: the data's)")
    m.set_defaults(fn=cmd_models)
    d = sub.add_parser("datasets", help="list the datasets")
    d.set_defaults(fn=cmd_datasets)
    rc = sub.add_parser("recipes", help="list the recipes shipped with cnnlab (use one with train --config NAME)")
    rc.set_defaults(fn=cmd_recipes)
    dc = sub.add_parser("data", help="data tools: `cnnlab data check DATA`")
    dsub = dc.add_subparsers(dest="data_command", metavar="check", parser_class=Parser, required=True)
    chk = dsub.add_parser("check", help="class counts, sizes, modes, unreadable files, duplicates across splits")
    chk.add_argument("data")
    chk.add_argument("--data-dir", default="data")
    chk.add_argument("--cache-dir", default="", help=HELP["cache_dir"])
    chk.add_argument("--in-memory", default="auto", choices=("auto", "yes", "no"), help=HELP["in_memory"])
    chk.set_defaults(fn=cmd_data_check)
    ca = sub.add_parser("cache", help="the decoded-images cache: `cnnlab cache list` (entries and sizes) or `clear`")
    ca.add_argument("cache_command", choices=("list", "clear"))
    ca.add_argument("--cache-dir", default="", help=HELP["cache_dir"])
    ca.set_defaults(fn=cmd_cache)
    lf = sub.add_parser("lr-find", help="LR range test: plot and suggested learning rate")
    add_train_flags(lf)
    lf.add_argument("--plot", help="where to write the plot (default: inside --out when given, else "
                                   "runs/lr_find-<model>-<data>.png)")
    lf.set_defaults(fn=cmd_lr_find)
    tu = sub.add_parser("tune", help="search hyperparameters with Optuna (TPE, pruning); each trial is a run folder")
    tu.add_argument("--config", type=recipe_path, metavar="RECIPE|FILE", help="the base settings every trial starts "
                    "from: a recipe name (see `cnnlab recipes`) or a YAML file (default: cnnlab's defaults)")
    tu.add_argument("--space", required=True, metavar="SPACE|FILE", help="the search space: a YAML file of KEY: "
                    "{choice: [..]} / {uniform|log_uniform|int|log_int: [low, high]} (KEY a train setting or "
                    "model_args.KNOB), or a shipped space's name (seed002_cifar2)")
    tu.add_argument("--trials", type=int, default=20, help="trials in the study in all, counting those already run "
                    "(by an interrupted run or other workers) [default: 20]")
    tu.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    tu.add_argument("--out", help="the tune folder (default runs/tune-<model>-<data>-<time>); run again with the "
                   "same --out to resume")
    tu.add_argument("--storage", metavar="URL", help="an Optuna RDB URL (e.g. postgresql://user@host/db) shared by "
                    "several workers [default: sqlite:///OUT/study.db]")
    tu.add_argument("--study", metavar="NAME", help="the study's name in the storage; workers with the same "
                    "--storage and --study share it [default: the tune folder's name]")
    tu.add_argument("--pruner", default="median", choices=("median", "halving", "none"),
                    help="stop weak trials early on their per-epoch val accuracy [default: median]")
    tu.set_defaults(fn=cmd_tune)
    for command in sub.choices.values():   # every command can see (and rebuild) the user's models and datasets
        command.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE",
                             help="import your module first: its @cnnlab.register_model / register_dataset entries, "
                                  "and the network of a checkpoint trained with your own class (repeatable)")
    name_commands(p)
    return p


def name_commands(parser):
    """Each (sub)command's own prog in its parsed args (`command_prog`), the innermost winning, so an
    unknown flag's error names the help that lists the right flags."""
    parser.set_defaults(command_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                name_commands(sub)


def console():
    """The `cnnlab` command and `python -m cnnlab`. A torchrun rank leaves without interpreter
    finalization: gloo's worker threads can outlive destroy_process_group (the DDP wrapper still
    holds the group) and, taking the GIL while the interpreter is torn down, abort the rank with
    "terminate called without an active exception" after its work is done (3 of 150 two-rank runs
    beside busy CPUs, and once in CI). Every file is closed by then; only stdio needs a flush."""
    code = main()
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        import logging

        logging.shutdown()   # a plugin's log handlers
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):   # closed, e.g. by a `| head`
                pass
        os._exit(code)
    sys.exit(code)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    from .allocator import reuse_freed_memory

    reuse_freed_memory()   # a command's process ends with it; see its docstring
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:   # argparse would name the top parser's help, not the command's
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `{args.command_prog} --help`)")
        if args.command is None:
            parser.print_help()
            return 0
        if getattr(args, "plugin", None):
            from .plugins import use

            use(args.plugin)
        if args.command == "train":  # the train flags as typed, for --nproc to hand to torchrun
            args.argv = [a for a in argv[argv.index("train") + 1:] if a != "--debug"]
        return args.fn(args) or 0
    except CnnlabError as e:
        if debug:
            raise
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0
    except Exception as e:  # an unexpected failure: still one line, and a way to see more
        from .training.engine import Interrupted

        if isinstance(e, Interrupted):
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"\ncnnlab: {e}", file=sys.stderr)
            return 130 if e.signum == 2 else 143
        if debug:
            raise
        print(f"cnnlab: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
