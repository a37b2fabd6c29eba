"""Where every benchmark's figures go: a JSON file and a PNG plot beside it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np


def pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay out (within `rect` of the figure, leaving the rest to a figure legend), write as PNG and close a
    benchmark's figure."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def write_result(result: dict, out_path: str, plot: Callable[[dict, str], None]) -> dict:
    """Write `result` to `out_path` and its plot to the same name with .png."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(out_path)[0] + ".png")
    return result


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and the mean (None for no values)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}
