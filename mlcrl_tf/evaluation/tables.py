"""The paper's Table 1 and Table 2 layouts, as Markdown."""

from collections.abc import Mapping
import math
import re

import numpy as np

_TABLE1_KEYS = ("mAP", "CF1", "CP", "CR", "OF1", "OP", "OR")
_TABLE1_TOPK_KEYS = ("CF1", "CP", "CR", "OF1", "OP", "OR")


def _format_value(value, name):
    """Percent with one decimal; (mean, std) -> "81.1 ± 0.3"; None -> "-"."""
    if value is None:
        return "-"
    if isinstance(value, (tuple, list, np.ndarray)):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be a number or a (mean, std) pair, got {value!r}.")
        mean, std = (_format_value(v, name) for v in value)
        return f"{mean} ± {std}"
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number or a (mean, std) pair, "
                         f"got {value!r}.") from e
    return "nan" if math.isnan(number) else f"{100.0 * number:.1f}"


def _markdown(header, body):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _cell_name(name):
    return str(name).replace("|", "\\|")


def format_table(rows, per_class=False, class_names=None):
    """Markdown table in the paper's Table 1 layout.

    Columns: ``method | mAP | CF1 | CP | CR | OF1 | OP | OR`` then the six
    top-k metrics ``CF1_top3 ... OR_top3`` (k read from the rows' keys).
    Values are percentages with one decimal; a (mean, std) pair renders as
    ``"81.1 ± 0.3"``, a missing key as ``"-"``, NaN as ``"nan"``.

    Args:
        rows: dict method name -> metrics dict (as from `multilabel_metrics`;
            values fractions in [0, 1] or (mean, std) pairs).
        per_class: also append the Table 2 layout (`format_per_class_ap`)
            for the rows that have an ``"AP"`` entry.
        class_names: class names for the per-class table (default: ids).

    Returns:
        The Markdown text.

    Raises:
        ValueError: if rows is empty / malformed or mixes top-k values.
    """
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("rows must be a non-empty dict of method name -> metrics dict.")
    ks = set()
    for name, metrics in rows.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"rows[{name!r}] must be a metrics dict, got {type(metrics)}.")
        for key in metrics:
            match = re.fullmatch(r"CF1_top(\d+)", str(key))
            if match:
                ks.add(int(match.group(1)))
    if len(ks) > 1:
        raise ValueError(f"rows mix top-k values {sorted(ks)}; use one top_k.")
    k = ks.pop() if ks else 3
    keys = list(_TABLE1_KEYS) + [f"{key}_top{k}" for key in _TABLE1_TOPK_KEYS]
    body = [[_cell_name(name)]
            + [_format_value(metrics.get(key), f"rows[{name!r}][{key!r}]") for key in keys]
            for name, metrics in rows.items()]
    table = _markdown(["method"] + keys, body)
    if per_class:
        with_ap = {name: metrics for name, metrics in rows.items() if "AP" in metrics}
        if not with_ap:
            raise ValueError("rows have no 'AP' entry; per_class=True needs per-class AP.")
        table += "\n\n" + format_per_class_ap(with_ap, class_names)
    return table


def format_per_class_ap(ap, class_names=None, method="model"):
    """Markdown table in the paper's Table 2 layout (one column per class + mAP).

    Args:
        ap: per-class AP, a sequence of C values (one row named `method`), or
            a dict name -> (sequence of C values, or a metrics dict with
            ``"AP"`` and optionally ``"mAP"``). Values are fractions or
            (mean, std) pairs; NaN renders as ``"nan"``.
        class_names: C column names (default: class ids 0..C-1).
        method: row name when `ap` is a single sequence.

    Returns:
        The Markdown text. The mAP column is the row's ``"mAP"`` if given,
        else the mean over the non-NaN per-class values (means of pairs).

    Raises:
        ValueError: if the rows' lengths differ or do not match class_names.
    """
    rows = ap if isinstance(ap, Mapping) else {method: ap}
    if not rows:
        raise ValueError("ap must not be empty.")
    body = []
    num_classes = None
    for name, entry in rows.items():
        given_map = None
        if isinstance(entry, Mapping):
            if "AP" not in entry:
                raise ValueError(f"ap[{name!r}] is a dict without an 'AP' entry.")
            given_map = entry.get("mAP")
            entry = entry["AP"]
        try:
            values = list(entry)
        except TypeError as e:
            raise ValueError(f"ap[{name!r}] must be a sequence of per-class AP.") from e
        if num_classes is None:
            num_classes = len(values)
        elif len(values) != num_classes:
            raise ValueError(
                f"ap rows have different class counts ({num_classes} and {len(values)}).")
        cells = [_format_value(v, f"ap[{name!r}]") for v in values]
        if given_map is None:
            means = [float(v[0] if isinstance(v, (tuple, list, np.ndarray)) else v)
                     for v in values]
            means = [m for m in means if not math.isnan(m)]
            given_map = sum(means) / len(means) if means else math.nan
        body.append([_cell_name(name)] + cells
                    + [_format_value(given_map, f"ap[{name!r}] mAP")])
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    elif len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names but ap has {num_classes} classes.")
    header = ["method"] + [_cell_name(c) for c in class_names] + ["mAP"]
    return _markdown(header, body)
