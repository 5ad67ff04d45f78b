"""docs/results.md and its figures, written by `benchmarks/ablation/ablation.py`.

Every sentence with a number is computed here from the runs' records (see
`ablation.analyse_run`); nothing on the page is edited by hand.
"""

import datetime
import json
import math
import os
import platform

import ablation_analysis as analysis
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tensorflow as tf

from mlcrl_tf.evaluation import cam_panels
from mlcrl_tf.evaluation import cams
from mlcrl_tf.evaluation import tables
from mlcrl_tf.run_dir import restore
from pipelines.records import shard_sets
from pipelines.tfdata import decoder
from pipelines.tfdata import preprocessing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARED = ("baseline", "tbc", "mse")
PER_SEED = ("mAP", "CF1", "OF1")


def percent(x):
    """A fraction as a percentage with one decimal; "n/a" for None or NaN."""
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _pm(values):
    mean, std = analysis.mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _has_hidden(runs):
    """Whether the hidden-label AP is defined in these runs (enough positives)."""
    return any(not math.isnan(r["hidden"]["mean"]) for r in runs)


def _by_variant(c, runs, setting):
    out = {}
    for variant in c.variants:
        chosen = sorted((r for r in runs if r["setting"] == setting
                         and r["variant"] == variant), key=lambda r: r["seed"])
        if chosen:
            out[variant] = chosen
    return out


def _run_configs(c, runs):
    """The training config (run.json) of every finished run, in `runs` order."""
    configs = []
    for r in runs:
        with open(os.path.join(c.path(c.run_name(r["setting"], r["variant"], r["seed"])),
                               "run.json"), encoding="utf-8") as f:
            configs.append(json.load(f)["config"])
    return configs


def _differing_fields(configs):
    """Config fields that differ between runs, beyond what each run sets itself."""
    own = {"model_dir", "variant", "seed", "train_files", "eval_files"}
    return sorted(k for k in configs[0]
                  if k not in own and any(cfg.get(k) != configs[0][k] for cfg in configs))


# --------------------------------------------------------------------------
# Page sections.
# --------------------------------------------------------------------------

def header_lines(c, runs, seconds, commit, pretrain_seconds):
    """Title, command, machine, wall time and commits (`commit`: the page's)."""
    total = sum(r["total_seconds"] for r in runs)
    cpu = sum(r.get("cpu_seconds", 0) for r in runs)
    commits = ", ".join(sorted({r.get("commit", "unknown") for r in runs}))
    return [
        "# Results: the paper's ablation in a miniature of its regime",
        "",
        "Written by `benchmarks/ablation/ablation.py`; do not edit by hand. Command:",
        "", "```bash", c.command, "```", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}; page written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Wall time: "
        f"{total / 60:.0f} min ({cpu / 60:.0f} CPU-min) of fine-tuning and evaluation over "
        f"{len(runs)} runs, plus "
        f"{pretrain_seconds / 60:.0f} min of pretraining ({seconds / 60:.0f} min in the "
        "last invocation of the driver, which reuses finished runs and the pretrained "
        "weights).",
        "",
        f"Code: runs trained at commit(s) {commits}; page written at commit {commit}.",
        "",
    ] + missing_lines(c)


def missing_lines(c):
    """The planned runs this page lacks (a page written with --page_only)."""
    if not c.missing:
        return []
    return [f"**Incomplete campaign: {len(c.missing)} planned run(s) have not finished** "
            f"and are not on this page: {', '.join(c.missing)}. Rerunning the command "
            "without `--page_only` trains them (finished runs are reused).", ""]


def rule_lines(c, compared):
    """The protocol and the verdict rule, fixed before any number is read."""
    return [
        "## Protocol and verdict rule (fixed before the runs)",
        "",
        f"- Every comparison is crl against {', '.join(compared)}, in each setting, on "
        f"two measures: mAP, and the hidden-label AP below. Seeds "
        f"{', '.join(map(str, c.seeds))}; a seed fixes the head initialisation and the "
        "data order, and every variant of a seed starts from the same pretrained "
        "backbone file, so differences are taken paired by seed.",
        "- For each comparison: the mean over seeds of (crl − other) and its 95 % "
        "Student-t interval, mean ± t(0.975, n − 1) · sd / √n.",
        "- **crl helps** only where the whole interval is above 0; **crl hurts** only "
        "where it is below 0; otherwise the result is *no demonstrated difference*, "
        "reported with what the interval excludes (a gain larger than its upper end, "
        "a loss larger than its lower end).",
        "- Numbers are the FINAL checkpoint of every run on the test canvases: no "
        "selection on the test set, no early stopping, no per-variant tuning.",
        f"- Hidden-label AP (paper Fig. 1b): for each class, the AP whose positives are "
        f"only the test images where EVERY item of the class is less than "
        f"{100 * analysis.HIDDEN_BELOW:.0f} % visible (annotation `visible_fraction`), "
        "against all test images without the class; the class's other positives are "
        f"ignored. Averaged over the classes with at least N = {c.min_positives} such "
        "positives. Ranked on the logits.",
        f"- Converged: the last two evaluations both come after the learning-rate decay "
        f"and the last one is less than {analysis.CONVERGED_RISE} mAP points above the "
        "one before. The budget was chosen so that at least 90 % of runs converge.",
        "",
    ]


def pretraining_lines(report):
    """The 'ImageNet stage'."""
    s = report["settings"]
    return [
        "## Pretraining (the \"ImageNet stage\")",
        "",
        f"The small CNN was pretrained once on single-item classification (softmax over "
        f"the 10 Fashion-MNIST classes) of {s['num_train']} canvases made from "
        f"Fashion-MNIST TRAIN photos by the demo set's own rendering (`make_canvas`, half "
        f"default and half occluded mode, {s['canvas_size']} px), {s['epochs']} epoch(s), "
        f"SGD momentum 0.9, learning rate {s['learning_rate']} with cosine decay, batch "
        f"{s['batch_size']} (`benchmarks/ablation/pretrain_backbone.py`, "
        f"{report['seconds'] / 60:.1f} min). Single-item TEST accuracy, on "
        f"{s['num_test']} canvases of Fashion-MNIST TEST photos measured once after "
        f"training: **{100 * report['test_accuracy']:.1f} %** (last-epoch train "
        f"accuracy {100 * report['train_accuracy_per_epoch'][-1]:.1f} %). Every "
        "fine-tuning run starts from this backbone file.",
        "",
    ]


def _budget_rationale(path):
    """The flagfile's comment block from "Budget" up to "Relative paths"."""
    with open(path, encoding="utf-8") as f:
        comments = [line[1:].strip() for line in f if line.startswith("#")]
    start = next((i for i, line in enumerate(comments) if line.startswith("Budget")),
                 len(comments))
    block = []
    for line in comments[start:]:
        if line.startswith("Relative paths"):
            break
        block.append(line)
    return block


def budget_lines(c, runs):
    """Data, budget (and how it was chosen) and the convergence count."""
    configs = _run_configs(c, runs)
    cfg, differing = configs[0], _differing_fields(configs)
    converged = sum(r["converged"] for r in runs)
    rises = [r["last_rise"] for r in runs]
    return [
        "## Data, budget, convergence",
        "",
        "Data: the Fashion-MNIST \"outfits\" demo set (README, `pipelines/demo/outfits.py`) "
        f"at {c.canvas_size} px, "
        f"{c.num_train} train / {c.num_test} test canvases per setting (generator seed "
        f"{c.data_seed}); train canvases from Fashion-MNIST's train photos only, test "
        "canvases from its test photos only.",
        "",
        f"Fine-tuning (`{c.flagfile}`, the same for every variant): {cfg['epochs']} "
        f"epochs, batch {cfg['batch_size']}, SGD momentum {cfg['momentum']}, weight "
        f"decay {cfg['weight_decay']}, head learning rate {cfg['learning_rate']}, "
        f"backbone {cfg['backbone_learning_rate']} (the paper's ratio 1/10), ×"
        f"{cfg['lr_decay_factor']} after epoch(s) "
        f"{', '.join(map(str, cfg['lr_decay_epochs']))}; the paper's losses. How this "
        f"budget was chosen (the comments of `{c.flagfile}`):",
        "",
        " ".join(_budget_rationale(os.path.join(REPO, c.flagfile))),
        "",
        *([f"**Warning: the runs differ in {', '.join(differing)}** (a run reused from an "
           "earlier invocation with other flags): the comparison is not like for like.",
           ""] if differing else []),
        f"Convergence: **{converged} of {len(runs)} runs converged** "
        f"({100 * converged / len(runs):.0f} %); last-epoch rise of the eval mAP "
        f"{np.mean(rises):+.2f} points on average (max {np.max(rises):+.2f}).",
        "",
    ]


def table_lines(c, by_variant, facts):
    """Table 1 (mean ± std over seeds) and the mAP / hidden-label AP table."""
    rows = {"label prior (train class frequencies)": facts["prior"]}
    for variant, chosen in by_variant.items():
        rows[variant] = {key: analysis.mean_std([r["metrics"][key] for r in chosen])
                         for key in chosen[0]["metrics"]}
    lines = ["Table 1 layout, in %, mean ± std over seeds:", "",
             tables.format_table(rows), "",
             "| method | seeds | mAP | hidden-label AP | converged | label-embedding ρ |",
             "|---|---:|---:|---:|---:|---:|",
             f"| label prior | - | {percent(facts['prior']['mAP'])} | "
             f"{percent(facts['prior_hidden'])} | - | - |"]
    for variant, chosen in by_variant.items():
        lines.append(
            f"| {variant} | {len(chosen)} | {_pm([r['metrics']['mAP'] for r in chosen])} | "
            f"{_pm([r['hidden']['mean'] for r in chosen])} | "
            f"{sum(r['converged'] for r in chosen)}/{len(chosen)} | {_rho_cell(chosen)} |")
    return lines + [""]


def hidden_positive_lines(c, facts):
    """How many mostly-hidden positives each class has."""
    counts = facts["hidden_counts"]
    names = facts["class_names"]
    eligible = [n for n, k in zip(names, counts) if k >= c.min_positives]
    if not eligible:
        return [f"Hidden-label AP: n/a in this setting: no class has {c.min_positives} test "
                f"images whose every item is < {100 * analysis.HIDDEN_BELOW:.0f} % visible "
                f"(most: {int(max(counts))}).", ""]
    return [
        f"Hidden-label positives per class (test images where every item of the class is "
        f"< {100 * analysis.HIDDEN_BELOW:.0f} % visible); the AP averages the "
        f"{len(eligible)} classes with at least {c.min_positives}:", "",
        "| " + " | ".join(names) + " |", "|" + "---:|" * len(names),
        "| " + " | ".join(str(int(k)) for k in counts) + " |", ""]


def verdict_lines(by_variant):
    """The pre-registered verdicts, mAP and hidden-label AP."""
    if "crl" not in by_variant:
        return []
    lines = ["Verdicts (the rule above; points of mAP / hidden-label AP):", ""]
    measures = [("mAP", lambda r: r["metrics"]["mAP"])]
    if _has_hidden(by_variant["crl"]):
        measures.append(("hidden-label AP", lambda r: r["hidden"]["mean"]))
    for unit, get in measures:
        crl = {r["seed"]: 100 * get(r) for r in by_variant["crl"]}
        for other in COMPARED:
            if other in by_variant:
                interval = analysis.paired_t_interval(
                    crl, {r["seed"]: 100 * get(r) for r in by_variant[other]})
                lines.append("- " + analysis.verdict_sentence(interval, other, unit))
    return lines + [""]


def _rho_cell(chosen):
    """mean ± std of ρ over the seeds where it is defined, and the collapses."""
    with_rho = [r for r in chosen if "rho" in r]
    if not with_rho:
        return "-"
    values = [r["rho"] for r in with_rho if not math.isnan(r["rho"])]
    cell = analysis.mean_std(values) if values else None
    text = f"{cell[0]:+.2f} ± {cell[1]:.2f}" if cell else "undefined"
    collapsed = len(with_rho) - len(values)
    return text + (f" ({collapsed} collapsed)" if collapsed else "")


def _rho_text(r):
    if "rho" not in r:
        return "-"
    return "collapsed" if math.isnan(r["rho"]) else f"{r['rho']:+.2f}"


def _units_lines(variant, chosen):
    """Per seed, the active ReLU units of f_l's hidden layers (why it collapsed)."""
    with_units = [r for r in chosen if "projector_units" in r]
    if not with_units:
        return []
    widths = ", ".join(str(w) for _, w in with_units[0]["projector_units"])
    per_seed = ", ".join("/".join(str(a) for a, _ in r["projector_units"])
                         for r in with_units)
    dead = sum(any(a == 0 for a, _ in r["projector_units"]) for r in with_units)
    return [f"  - {variant}'s f_l: ReLU units active for at least one class, per hidden "
            f"layer (of {widths}), per seed: {per_seed}; {dead} of {len(with_units)} "
            "seeds have a layer with no active unit (dead ReLUs: a constant output, the "
            "collapse)."]


def embedding_lines(by_variant, figure):
    """Agreement of the label projector with label co-occurrence."""
    lines = []
    for variant in ("crl", "mse"):
        chosen = [r for r in by_variant.get(variant, []) if "rho" in r]
        if not chosen:
            continue
        collapsed = [r for r in chosen if math.isnan(r["rho"])]
        text = (f"- {variant}: Spearman ρ(−‖f_l(e_i) − f_l(e_j)‖, PMI(i, j)) over the "
                f"{chosen[0]['rho_pairs']} class pairs = {_rho_cell(chosen)} (per seed "
                + ", ".join(_rho_text(r) for r in chosen) + ")")
        if collapsed:
            spread = max(r["embedding_spread"] for r in collapsed)
            text += (f"; in {len(collapsed)} of {len(chosen)} seeds the label projector "
                     "collapsed: every class got the same embedding (largest distance "
                     f"between two classes {spread:.1e})")
        lines.append(text + ".")
        lines += _units_lines(variant, chosen)
    if not lines:
        return []
    head = ["What the label projector learned (ρ > 0: classes that co-occur more than "
            "chance have closer label embeddings):", ""]
    tail = [""]
    if figure:
        tail += ["Training-label PMI | −distance of crl's label embeddings | of mse's "
                 "(first seed; blue low, red high, gray never co-occur or diagonal, which "
                 "ρ excludes):", "", f"![label embeddings]({figure})", ""]
    return head + lines + tail


def per_seed_lines(by_variant):
    """One row per run."""
    lines = ["Per seed:", "",
             "| variant | seed | " + " | ".join(PER_SEED) + " | hidden AP | eval mAP, "
             "last 3 epochs | last rise | converged | ρ | wall (CPU) time | commit |",
             "|---|---:|" + "---:|" * (len(PER_SEED) + 1) + "---|---:|---|---:|---:|---|"]
    for variant, chosen in by_variant.items():
        for r in chosen:
            curve = " → ".join(percent(m) for m in r["eval_maps"][-3:])
            rho = _rho_text(r)
            lines.append(
                f"| {variant} | {r['seed']} | "
                + " | ".join(percent(r["metrics"][k]) for k in PER_SEED)
                + f" | {percent(r['hidden']['mean'])} | {curve} | {r['last_rise']:+.2f} | "
                f"{'yes' if r['converged'] else 'no'} | {rho} | "
                f"{r['total_seconds'] / 60:.1f} min ({r.get('cpu_seconds', 0) / 60:.1f}) | "
                f"{r.get('commit', '?')} |")
    return lines + [""]


def setting_lines(c, setting, runs, facts, figures):
    """The whole section of one setting."""
    by_variant = _by_variant(c, runs, setting)
    if not by_variant:
        return []
    lines = [f"## Setting: {setting}", ""]
    lines += table_lines(c, by_variant, facts)
    lines += hidden_positive_lines(c, facts)
    lines += verdict_lines(by_variant)
    lines += embedding_lines(by_variant, figures.get(f"embeddings_{setting}"))
    if figures.get(f"cams_{setting}"):
        lines += ["CAM pictures (paper Fig. 3) of the first test canvases, seed 0, each "
                  "canvas's first true class: crl's image | direct-head CAM | f_conv map, "
                  "then baseline's image | direct-head CAM.", "",
                  f"![CAMs, {setting}]({figures[f'cams_{setting}']})", ""]
    return lines + per_seed_lines(by_variant)


def _paired_text(interval):
    if np.isnan(interval["half_width"]):
        return f"{interval['mean']:+.2f}, one seed: no interval"
    return (f"{interval['mean']:+.2f}, 95 % CI [{interval['low']:+.2f}, "
            f"{interval['high']:+.2f}]")


def headline_lines(c, runs):
    """A paragraph for the README: every headline number with its spread."""
    parts = []
    for setting in c.settings:
        by_variant = _by_variant(c, runs, setting)
        if "crl" not in by_variant or "baseline" not in by_variant:
            continue
        crl, base = by_variant["crl"], by_variant["baseline"]
        text = [f"{setting} setting:"]
        measures = [("mAP", lambda r: r["metrics"]["mAP"])]
        if _has_hidden(crl):
            measures.append(("hidden-label AP", lambda r: r["hidden"]["mean"]))
        for key, get in measures:
            interval = analysis.paired_t_interval({r["seed"]: 100 * get(r) for r in crl},
                                                  {r["seed"]: 100 * get(r) for r in base})
            text.append(f"{key} crl {_pm([get(r) for r in crl])} vs baseline "
                        f"{_pm([get(r) for r in base])} (paired difference "
                        f"{_paired_text(interval)})")
        parts.append(text[0] + " " + "; ".join(text[1:]))
    if not parts:
        return []
    counts = sorted({len({r["seed"] for r in runs if r["variant"] == v})
                     for v in {r["variant"] for r in runs}})
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return ["## Headline (for the README)", "",
            f"Small CNN pretrained on single Fashion-MNIST items, fine-tuned to "
            f"convergence on the outfits set, {seeds} seed(s) per variant, mean ± "
            "std over seeds: " + "; ".join(parts) + ".", ""]


def write(c, runs, facts, pretrain_report, seconds, figures, commit):
    """Writes the whole page.

    Args:
        c: the `ablation.Campaign`.
        runs: analysed run records (`ablation.analyse_run`).
        facts: setting -> `ablation.setting_facts`.
        pretrain_report: the pretraining's JSON report.
        seconds: wall time of this invocation of the driver.
        figures: figure key -> PNG name relative to the page (or None).
        commit: the commit the page is written at.
    """
    settings = [s for s in c.settings if any(r["setting"] == s for r in runs)]
    compared = [v for v in COMPARED if v in c.variants]
    # The rule comes before any result.
    lines = header_lines(c, runs, seconds, commit, pretrain_report["seconds"])
    lines += rule_lines(c, compared)
    lines += headline_lines(c, runs) + pretraining_lines(pretrain_report)
    lines += budget_lines(c, runs)
    for setting in settings:
        lines += setting_lines(c, setting, runs, facts[setting], figures)
    os.makedirs(os.path.dirname(os.path.abspath(c.output)), exist_ok=True)
    with open(c.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------

def _labelled(matrix_picture, title, class_names, cell):
    """A heatmap with a title and the class ids on both axes."""
    font = ImageFont.load_default()
    margin, top = 20, 18
    side = matrix_picture.shape[0]
    panel = Image.new("RGB", (side + margin + 6, side + top + margin), "white")
    panel.paste(Image.fromarray(matrix_picture), (margin, top))
    draw = ImageDraw.Draw(panel)
    draw.text((margin, 2), title, fill="black", font=font)
    for i in range(len(class_names)):
        draw.text((4, top + i * cell + cell // 3), str(i), fill="black", font=font)
        draw.text((margin + i * cell + cell // 3, top + side + 4), str(i), fill="black",
                  font=font)
    return np.asarray(panel)


def write_embedding_figure(c, setting, runs, facts, cell=24):
    """PMI of the training labels next to −distance of crl's and mse's label
    embeddings (seed 0 or the first seed). Returns the PNG name or None."""
    panels = [_labelled(analysis.heatmap(np.where(np.eye(len(facts["pmi"]), dtype=bool),
                                                  np.nan, facts["pmi"]), cell),
                        "train label PMI", facts["class_names"], cell)]
    for variant in ("crl", "mse"):
        chosen = sorted((r for r in runs if r["setting"] == setting
                         and r["variant"] == variant and "embeddings" in r),
                        key=lambda r: r["seed"])
        if chosen:
            distance = analysis.pairwise_distances(chosen[0]["embeddings"])
            np.fill_diagonal(distance, np.nan)
            panels.append(_labelled(analysis.heatmap(-distance, cell),
                                    f"{variant} -distance", facts["class_names"], cell))
    if len(panels) == 1:
        return None
    legend = "  ".join(f"{i}={name}" for i, name in enumerate(facts["class_names"]))
    strip = np.concatenate(panels, axis=1)
    canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + 16), "white")
    canvas.paste(Image.fromarray(strip), (0, 0))
    ImageDraw.Draw(canvas).text((4, strip.shape[0] + 2), legend, fill="black",
                                font=ImageFont.load_default())
    name = f"label_embeddings_{setting}.png"
    directory = os.path.dirname(os.path.abspath(c.output))
    os.makedirs(directory, exist_ok=True)
    canvas.save(os.path.join(directory, name))
    return name


def _cam_row(models, example, class_names, tile):
    """One canvas: for each model, its image | CAM panels."""
    image = decoder.decode_image(example["image_bytes"])
    class_id = int(np.flatnonzero(example["labels"].numpy())[0])
    panels = []
    for variant, (model, config, _, _) in models.items():
        pixels = preprocessing.preprocess_eval(image, config.image_size).numpy()
        display = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        result = cams.compute_cams(model, pixels[None], [class_id])
        maps = {"direct": result["direct"][0, 0]}
        if result["f_conv"] is not None:
            maps["f_conv"] = result["f_conv"][0, 0]
        score = float(result["probabilities"][0, class_id])
        panels.append(cam_panels.render_cam_panel(
            display, maps, f"{variant}: {class_names[class_id]}", score, tile))
    return np.concatenate(panels, axis=1)


def write_cam_figure(c, setting, data_root, num_images=4, tile=128):
    """cams_<setting>.png: crl's direct-head CAM and f_conv map next to
    baseline's CAM (paper Fig. 3) for the first test canvases, seed 0 (or the
    first seed). Returns the PNG name (relative to the page) or None."""
    models = {}
    for variant in ("crl", "baseline"):
        model_dir = c.path(c.run_name(setting, variant, c.seeds[0]))
        if not os.path.exists(os.path.join(model_dir, "run.json")):
            return None
        models[variant] = restore.restore_model(model_dir)
    class_names = models["crl"][2]
    files = shard_sets.find_shards(os.path.join(data_root, "tfrecords", "test-*.tfrecord"))
    rows = [_cam_row(models, decoder.decode_example(record, len(class_names)),
                     class_names, tile)
            for record in tf.data.TFRecordDataset(files).take(num_images)]
    path = os.path.join(os.path.dirname(os.path.abspath(c.output)), f"cams_{setting}.png")
    cam_panels.save_png(np.concatenate(rows, axis=0), path)
    return os.path.basename(path)
