r"""python benchmarks/ablation/ablation.py --work_dir=runs/ablation --output=docs/results.md

The paper's ablation (Tables 1, 5, 6) in a faithful miniature of its regime
(paper §5.1, issue 14), on the Fashion-MNIST "outfits" demo set (README, pipelines/demo/outfits.py):

1. Pretraining once (the "ImageNet stage", `benchmarks/ablation/pretrain_backbone.py`):
   the small CNN learns single-item classification of Fashion-MNIST TRAIN
   photos on demo canvases; its backbone weights go to a file.
2. For every (setting, seed, variant): fine-tuning from that file by the real
   command `python -m mlcrl_tf.train --flagfile=configs/ablation.flags
   --backbone_weights=<file>` (backbone learning rate = head / 10, as in the
   paper), then evaluation of the FINAL checkpoint (never the best one: that
   would select on the test set) by `python -m mlcrl_tf.evaluate`, which also
   writes the per-image logits. Seeds change the head initialisation and the
   data order only.
3. `docs/results.md` and its figures, written entirely from the runs' files by
   this script: Table 1 per variant (mean ± std over seeds), per-seed rows,
   the label-prior row, the hidden-label AP (paper Fig. 1b), the label
   projector's agreement with label co-occurrence, the convergence count, and
   the pre-registered paired-by-seed verdicts (`ablation_analysis`).

Settings: `standard` (items fully visible) and `occluded` (larger items,
overlapping and cut by the canvas edge, >= 25 % visible).

Resumable: a finished run (its JSON and scores exist) is reused; an
interrupted one resumes from its last checkpoint; the pretraining and the data
are cached. Each run records the git commit it ran on. `--page_only` trains
nothing and writes the page of a stopped (or still running) campaign from its
finished runs, naming the planned runs it lacks.
"""

import dataclasses
import glob
import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for _path in (REPO, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# pylint: disable=wrong-import-position
import ablation_analysis as analysis  # noqa: E402
import ablation_page as page  # noqa: E402

from mlcrl_tf.evaluation import metrics
from mlcrl_tf.run_dir import restore
from pipelines.records import label_maps
from pipelines.records import shard_sets
from pipelines.tfdata import decoder

# pylint: enable=wrong-import-position

VARIANTS = ("baseline", "tbc", "mse", "crl", "tba")
SETTINGS = {"standard": [], "occluded": ["--occlusion"]}


@dataclasses.dataclass(frozen=True)
class Campaign:
    """Everything the driver's flags decide (see `define_flags`)."""

    work_dir: str
    output: str
    variants: tuple
    settings: tuple
    seeds: tuple
    flagfile: str
    canvas_size: int
    num_train: int
    num_test: int
    data_seed: int
    pretrain_canvases: int
    pretrain_epochs: int
    min_positives: int
    command: str
    page_only: bool = False
    missing: tuple = ()  # planned runs not finished (page_only)

    def run_name(self, setting, variant, seed):
        return f"{setting}_{variant}_seed{seed}"

    def path(self, *parts):
        return os.path.join(self.work_dir, *parts)


# --------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------

def run_command(args, log_path):
    """Runs a command from the repo root, logging to a file; raises on failure."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed; see {log_path}")


def current_commit():
    """Short HEAD hash, with "+dirty" if tracked code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mlcrl_tf",
                                "pipelines", "benchmarks", "configs"], cwd=REPO,
                               check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _data_is_current(c, setting, root):
    """Whether `root` holds this campaign's demo set (same sizes, seed, mode)."""
    if not os.path.exists(os.path.join(root, "tfrecords", "test_report.json")):
        return False
    for split, count in (("train", c.num_train), ("test", c.num_test)):
        with open(os.path.join(root, "annotations", f"instances_{split}.json"),
                  encoding="utf-8") as f:
            coco = json.load(f)
        info = coco["info"]
        if (len(coco["images"]), info["seed"], info["canvas_size"], info["occlusion"]) != (
                count, c.data_seed, c.canvas_size, setting == "occluded"):
            return False
    return True


def make_data(c, setting):
    """Generates the setting's demo set unless current; returns its root directory."""
    root = c.path(f"data_{setting}")
    if not _data_is_current(c, setting, root):
        os.makedirs(c.work_dir, exist_ok=True)
        run_command([sys.executable, "-m", "pipelines.demo_dataset", f"--output_dir={root}",
                     f"--canvas_size={c.canvas_size}", f"--num_train={c.num_train}",
                     f"--num_test={c.num_test}", f"--seed={c.data_seed}", "--overwrite",
                     *SETTINGS[setting]], c.path(f"data_{setting}.log"))
    return root


def pretrain(c):
    """Pretrains the backbone once (cached); returns (weights file, report).

    With `c.page_only`, only reads the report of the pretraining done.
    """
    weights = c.path("pretrain", f"small_cnn_{c.canvas_size}.weights.h5")
    if c.page_only:
        if not os.path.exists(weights + ".json"):
            raise SystemExit(f"error: no pretraining report {weights}.json.")
        with open(weights + ".json", encoding="utf-8") as f:
            return weights, json.load(f)
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    run_command([sys.executable, "benchmarks/ablation/pretrain_backbone.py", f"--output={weights}",
                 f"--canvas_size={c.canvas_size}", f"--num_train={c.pretrain_canvases}",
                 f"--epochs={c.pretrain_epochs}"], c.path("pretrain", "pretrain.log"))
    with open(weights + ".json", encoding="utf-8") as f:
        return weights, json.load(f)


# --------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------

def read_eval_curve(model_dir):
    """Eval mAP after each epoch, from the TensorBoard events under <model_dir>/eval.

    A resumed run may log a step twice; the last value of a step wins.
    """
    by_step = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "eval", "events.out.tfevents.*"))):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                if value.tag == "metrics/mAP":
                    by_step[event.step] = float(tf.make_ndarray(value.tensor))
    return [by_step[step] for step in sorted(by_step)]


def save_label_projector(model_dir, embeddings_path, units_path):
    """From the run's final checkpoint: E = f_l(I_C) as .npy, and the active
    ReLU units of f_l's hidden layers as JSON ([[active, width], ...])."""
    model = restore.restore_model(model_dir)[0]
    np.save(embeddings_path, model.label_embeddings().numpy())
    weights = [(layer.kernel.numpy(), layer.bias.numpy())
               for layer in model.label_projector.dense_layers]
    with open(units_path, "w", encoding="utf-8") as f:
        json.dump(analysis.active_relu_units(weights), f)


def _train(c, name, records, weights, variant, seed):
    run_command([sys.executable, "-m", "mlcrl_tf.train", f"--flagfile={c.flagfile}",
                 f"--model_dir={c.path(name)}", f"--variant={variant}", f"--seed={seed}",
                 f"--image_size={c.canvas_size}", f"--backbone_weights={weights}",
                 f"--train_files={os.path.join(records, 'train-*.tfrecord')}",
                 f"--eval_files={os.path.join(records, 'test-*.tfrecord')}"],
                c.path(f"{name}.train.log"))


def _evaluate(c, name):
    eval_json = c.path(f"{name}.eval.json")
    run_command([sys.executable, "-m", "mlcrl_tf.evaluate", f"--model_dir={c.path(name)}",
                 f"--output_json={eval_json}", f"--output_scores={c.path(name)}.scores.npz"],
                c.path(f"{name}.eval.log"))
    with open(eval_json, encoding="utf-8") as f:
        return json.load(f)


def _children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_and_evaluate(c, setting, data_root, weights, variant, seed):
    """One run (reused if finished): train, evaluate, record. Returns its record."""
    name = c.run_name(setting, variant, seed)
    record_path = c.path(f"{name}.json")
    projector_files = (c.path(f"{name}.embeddings.npy"), c.path(f"{name}.units.json"))
    if os.path.exists(record_path) and os.path.exists(c.path(f"{name}.scores.npz")):
        if variant in ("mse", "crl") and not os.path.exists(projector_files[1]):
            save_label_projector(c.path(name), *projector_files)  # a run of an older driver
        with open(record_path, encoding="utf-8") as f:
            return json.load(f)
    start, cpu_start, commit = time.time(), _children_cpu_seconds(), current_commit()
    _train(c, name, os.path.join(data_root, "tfrecords"), weights, variant, seed)
    train_seconds = time.time() - start
    evaluation = _evaluate(c, name)
    if variant in ("mse", "crl"):
        save_label_projector(c.path(name), *projector_files)
    with open(os.path.join(c.path(name), "run.json"), encoding="utf-8") as f:
        decay = json.load(f)["config"]["lr_decay_epochs"]
    record = {"setting": setting, "variant": variant, "seed": seed,
              "commit": commit, "metrics": evaluation["metrics"],
              "per_class_ap": evaluation["per_class_ap"],
              "eval_maps": read_eval_curve(c.path(name)),
              "decay_epoch": max(decay) if decay else 0,
              "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.time() - start, 1),
              "cpu_seconds": round(_children_cpu_seconds() - cpu_start, 1)}
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record


# --------------------------------------------------------------------------
# Analyses of the finished runs.
# --------------------------------------------------------------------------

def read_split_labels(records, split):
    """(N, C) multi-hot labels of a split's TFRecords, in file order."""
    num_classes = len(label_maps.read_class_names(records))
    files = shard_sets.find_shards(os.path.join(records, f"{split}-*.tfrecord"))
    ds = tf.data.TFRecordDataset(files).map(
        lambda r: decoder.decode_example(r, num_classes)["labels"])
    return np.stack(list(ds.as_numpy_iterator())).astype(np.float32)


def setting_facts(c, data_root):
    """What every run of a setting shares, from its data directory."""
    records = os.path.join(data_root, "tfrecords")
    with open(os.path.join(data_root, "annotations", "instances_test.json"),
              encoding="utf-8") as f:
        coco = json.load(f)
    return facts_from(read_split_labels(records, "train"), read_split_labels(records, "test"),
                      coco, c.min_positives)


def facts_from(train, test, coco, min_positives):
    """Label prior metrics, PMI and the hidden-label counts of a setting.

    Args:
        train, test: (N, C) multi-hot labels of the splits.
        coco: the test split's COCO dict (with `visible_fraction`).
        min_positives: the hidden-label AP's N.
    """
    prior = metrics.multilabel_metrics(np.tile(train.mean(axis=0), (len(test), 1)), test)
    prior.pop("AP")
    names = [image["file_name"] for image in coco["images"]]
    positives, ignore = analysis.hidden_label_masks(
        analysis.max_visible_fraction(coco, names, train.shape[1]))
    prior_hidden = analysis.hidden_label_ap(np.tile(train.mean(axis=0), (len(names), 1)),
                                            positives, ignore, min_positives)
    return {"prior": prior, "train_labels": train, "pmi": analysis.pmi_matrix(train),
            "coco": coco, "class_names": [x["name"] for x in coco["categories"]],
            "hidden_counts": positives.sum(axis=0), "prior_hidden": prior_hidden["mean"]}


def hidden_ap_of_run(c, record, facts):
    """Hidden-label AP of a run from its per-image logits (see the analysis)."""
    scores = np.load(c.path(c.run_name(record["setting"], record["variant"],
                                       record["seed"]) + ".scores.npz"))
    filenames = [str(name) for name in scores["filenames"]]
    best = analysis.max_visible_fraction(facts["coco"], filenames, scores["labels"].shape[1])
    if not np.array_equal(~np.isnan(best), scores["labels"] > 0.5):
        raise ValueError(f"{record['setting']}: the scores' labels differ from the "
                         "annotations' classes; regenerate the data or rerun the run.")
    positives, ignore = analysis.hidden_label_masks(best)
    return analysis.hidden_label_ap(scores["logits"], positives, ignore, c.min_positives)


def analyse_run(c, record, facts):
    """Adds the derived numbers to a run record (hidden AP, convergence, rho)."""
    out = dict(record)
    out["hidden"] = hidden_ap_of_run(c, record, facts)
    out["converged"], out["last_rise"] = analysis.convergence(record["eval_maps"],
                                                              record["decay_epoch"])
    embeddings = c.path(c.run_name(record["setting"], record["variant"], record["seed"])
                        + ".embeddings.npy")
    if os.path.exists(embeddings):
        out["embeddings"] = np.load(embeddings)
        out["rho"], out["rho_pairs"] = analysis.embedding_pmi_correlation(
            out["embeddings"], facts["train_labels"])
        # 0 = every class has the same embedding (the label projector collapsed).
        out["embedding_spread"] = float(analysis.pairwise_distances(out["embeddings"]).max())
    units = c.path(c.run_name(record["setting"], record["variant"], record["seed"])
                   + ".units.json")
    if os.path.exists(units):
        with open(units, encoding="utf-8") as f:
            out["projector_units"] = json.load(f)
    return out


# --------------------------------------------------------------------------
# The campaign.
# --------------------------------------------------------------------------

def finished_record(c, setting, variant, seed):
    """The record of a finished run (its JSON and scores exist), else None."""
    name = c.run_name(setting, variant, seed)
    if not (os.path.exists(c.path(f"{name}.json"))
            and os.path.exists(c.path(f"{name}.scores.npz"))):
        return None
    with open(c.path(f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def page_only_campaign(c):
    """(campaign restricted to the seeds with a finished run, unfinished run names).

    For `--page_only`: the page of a campaign that is still running or was
    stopped, written from its finished runs only.
    """
    planned = [(seed, setting, variant) for seed in c.seeds for setting in c.settings
               for variant in c.variants]
    missing = [c.run_name(setting, variant, seed) for seed, setting, variant in planned
               if finished_record(c, setting, variant, seed) is None]
    seeds = tuple(seed for seed in c.seeds
                  if any(finished_record(c, setting, variant, seed) is not None
                         for setting in c.settings for variant in c.variants))
    if not seeds:
        raise SystemExit(f"error: no finished run under {c.work_dir}.")
    return dataclasses.replace(c, seeds=seeds, missing=tuple(missing)), missing


def run_campaign(c):
    """Pretraining, every run, then the page; returns the analysed runs.

    With `c.page_only`, trains nothing: the page is written from the
    finished runs, and says which planned runs are missing.
    """
    start = time.time()
    if c.page_only:
        c, _ = page_only_campaign(c)
    weights, pretrain_report = pretrain(c)
    roots = {setting: make_data(c, setting) for setting in c.settings}
    facts = {setting: setting_facts(c, root) for setting, root in roots.items()}
    runs = []
    for seed in c.seeds:  # seeds outermost: an interrupted campaign stays balanced
        for setting in c.settings:
            for variant in c.variants:
                if c.page_only:
                    record = finished_record(c, setting, variant, seed)
                    if record is None:
                        continue
                else:
                    record = train_and_evaluate(c, setting, roots[setting], weights,
                                                variant, seed)
                runs.append(analyse_run(c, record, facts[setting]))
                print(f"{setting:9s} {variant:8s} seed {seed}: mAP "
                      f"{100 * record['metrics']['mAP']:.1f}, hidden-label AP "
                      f"{page.percent(runs[-1]['hidden']['mean'])}, converged "
                      f"{runs[-1]['converged']} ({record['total_seconds'] / 60:.1f} min)",
                      flush=True)
                page.write(c, runs, facts, pretrain_report, time.time() - start, {},
                           current_commit())
    figures = {}
    for setting in c.settings:
        figures[f"cams_{setting}"] = page.write_cam_figure(c, setting, roots[setting])
        figures[f"embeddings_{setting}"] = page.write_embedding_figure(
            c, setting, runs, facts[setting])
    page.write(c, runs, facts, pretrain_report, time.time() - start, figures,
               current_commit())
    return runs


def define_flags():
    """The driver's flags (only when run as a program)."""
    flags.DEFINE_string("work_dir", "runs/ablation", "Data, weights, runs and records.")
    flags.DEFINE_string("output", "docs/results.md", "The results page to write.")
    flags.DEFINE_list("variants", ["baseline", "tbc", "mse", "crl"], "Variants to train.")
    flags.DEFINE_list("settings", list(SETTINGS), "Settings: standard, occluded.")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (head init, data order).")
    flags.DEFINE_string("flagfile_config", "configs/ablation.flags",
                        "Training hyper-parameters shared by every run.")
    flags.DEFINE_integer("canvas_size", 64, "Demo canvas size = model input size.")
    flags.DEFINE_integer("num_train", 4000, "Training canvases per setting.")
    flags.DEFINE_integer("num_test", 2000, "Test canvases per setting.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the demo data generator.")
    flags.DEFINE_integer("pretrain_canvases", 30000, "Single-item pretraining canvases.")
    flags.DEFINE_integer("pretrain_epochs", 6, "Pretraining epochs.")
    flags.DEFINE_integer("min_positives", 50, "Hidden-label AP: a class counts only with "
                         "at least this many mostly-hidden test positives.")
    flags.DEFINE_bool("page_only", False, "Train nothing: write the page (and figures) "
                      "from the finished runs, naming the planned runs that are missing.")


def main(argv):
    del argv
    f = flags.FLAGS
    bad = sorted(set(f.variants) - set(VARIANTS)) + sorted(set(f.settings) - set(SETTINGS))
    if bad:
        sys.exit(f"error: unknown --variants/--settings value {bad[0]!r}.")
    # Absolute paths: the CLIs run from the repository root.
    c = Campaign(work_dir=os.path.abspath(f.work_dir), output=os.path.abspath(f.output),
                 variants=tuple(f.variants),
                 settings=tuple(f.settings), seeds=tuple(int(s) for s in f.seeds),
                 flagfile=f.flagfile_config, canvas_size=f.canvas_size,
                 num_train=f.num_train, num_test=f.num_test, data_seed=f.data_seed,
                 pretrain_canvases=f.pretrain_canvases, pretrain_epochs=f.pretrain_epochs,
                 min_positives=f.min_positives, page_only=f.page_only,
                 command=" ".join(["python benchmarks/ablation/ablation.py"] + sys.argv[1:]))
    run_campaign(c)
    print(f"Wrote {c.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
