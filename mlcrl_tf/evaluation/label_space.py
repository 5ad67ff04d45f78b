"""What the label projector learned: f_l(I_C) against label co-occurrence.

Embedding closeness next to the training labels' PMI, and Spearman's rho over
class pairs (docs/design.md, Label embeddings in TensorBoard).
"""

import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from mlcrl_tf.evaluation import cams

_TEXT_HEIGHT = 13
_CHAR_WIDTH = 6
_GAP = 8
_NAME_CHARS = 14
_MIN_CELL_FOR_NAMES = 12


def pairwise_distances(embeddings):
    """Euclidean distances between the rows of a (C, D) matrix, float64 (C, C)."""
    e = np.asarray(embeddings, np.float64)
    diff = e[:, None, :] - e[None, :, :]
    return np.sqrt((diff ** 2).sum(axis=-1))


def average_ranks(values):
    """Ranks 1..n of a 1-D array; tied values share their average rank."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_run = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    run = np.cumsum(starts_run) - 1
    first = np.flatnonzero(starts_run)
    last = np.concatenate([first[1:], [len(values)]]) - 1
    ranks = np.empty(len(values), np.float64)
    ranks[order] = (first + last)[run] / 2.0 + 1.0
    return ranks


def spearman(x, y):
    """Spearman's rho (Pearson correlation of average ranks); NaN if undefined."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denominator) if denominator else math.nan


def cooccurrence_correlation(embeddings, pmi):
    """Spearman(-distance of the label embeddings, PMI) over pairs i < j.

    Args:
        embeddings: (C, D) label embeddings E = f_l(I_C).
        pmi: (C, C) PMI of the training labels (`pipelines.label_stats.pmi`;
            -inf for pairs never seen together ranks lowest).

    Returns:
        (rho, number of pairs); rho is NaN when undefined.
    """
    upper = np.triu_indices(len(embeddings), k=1)
    closeness = -pairwise_distances(embeddings)[upper]
    return spearman(closeness, np.asarray(pmi, np.float64)[upper]), len(upper[0])


def closeness_matrix(distances):
    """`1 - d / max d` in [0, 1] (all 1 when every distance is 0)."""
    d = np.asarray(distances, np.float64)
    largest = float(d.max()) if d.size else 0.0
    return np.ones_like(d) if largest <= 0 else 1.0 - d / largest


def pmi_display(pmi):
    """PMI scaled to [0, 1]: 0.5 = chance, 0 = never together, 1 on the diagonal."""
    values = np.asarray(pmi, np.float64)
    off_diagonal = ~np.eye(len(values), dtype=bool)
    finite = values[np.isfinite(values) & off_diagonal]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    scaled = np.clip(values / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(values)
    shown = np.where(np.isneginf(values), 0.0, 0.5 + 0.5 * np.nan_to_num(scaled))
    return np.where(off_diagonal, shown, 1.0)


def _cells(values, cell):
    """A [0, 1] (C, C) matrix as a jet-coloured uint8 image of cell-sized squares."""
    return np.kron(cams.jet(values), np.ones((cell, cell, 1), np.uint8))


def _draw_names(draw, class_names, top, cell):
    for i, name in enumerate(class_names):
        text = name if len(name) <= _NAME_CHARS else name[:_NAME_CHARS - 1] + "…"
        draw.text((2, top + i * cell + (cell - _TEXT_HEIGHT) // 2 + 1), text,
                  fill=(255, 255, 255), font=ImageFont.load_default())


def comparison_image(embeddings, pmi, class_names, caption=""):
    """Embedding closeness | training PMI, side by side (see the module doc).

    Args:
        embeddings: (C, D) label embeddings.
        pmi: (C, C) PMI of the training labels.
        class_names: the C names (drawn as row labels when the cells are
            large enough, i.e. up to about 40 classes).
        caption: a line under the panels (e.g. the correlation).

    Returns:
        uint8 (H, W, 3).
    """
    num_classes = len(class_names)
    cell = int(np.clip(480 // max(num_classes, 1), 1, 24))
    names_width = (_NAME_CHARS * _CHAR_WIDTH + 4) if cell >= _MIN_CELL_FOR_NAMES else 0
    left = _cells(closeness_matrix(pairwise_distances(embeddings)), cell)
    right = _cells(pmi_display(pmi), cell)
    side = num_classes * cell
    width = max(names_width + 2 * side + _GAP, len(caption) * _CHAR_WIDTH + 4)
    canvas = Image.new("RGB", (width, side + 2 * _TEXT_HEIGHT + 4), (0, 0, 0))
    canvas.paste(Image.fromarray(left), (names_width, _TEXT_HEIGHT + 2))
    canvas.paste(Image.fromarray(right), (names_width + side + _GAP, _TEXT_HEIGHT + 2))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for x, title in ((names_width, "f_l: 1 - distance/max"),
                     (names_width + side + _GAP, "train PMI (green: chance)")):
        draw.text((x, 1), title[:max(side // _CHAR_WIDTH, 3)], fill=(255, 255, 255),
                  font=font)
    draw.text((2, side + _TEXT_HEIGHT + 3), caption, fill=(255, 255, 255), font=font)
    if names_width:
        _draw_names(draw, class_names, _TEXT_HEIGHT + 2, cell)
    return np.asarray(canvas)
