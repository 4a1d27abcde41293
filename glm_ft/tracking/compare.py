"""Compare a sweep's runs: `python -m glm_ft compare [--sweep RUN_ID|SWEEP_DIR] [--metric NAME] [--experiment NAME]`.

Reads the latest sweep (or the one named) from MLflow, prints its children's swept parameters against their final
metrics, best first, and writes a PNG of the metric against each swept parameter and of each run's metric over its
steps (MLflow's metric history) into the sweep folder (the current folder when the sweep folder isn't on this
machine); the PNG is also logged to the sweep's parent run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from glm_ft.tracking.params import PER_RUN_PARAMS, metric_name
from glm_ft.tracking.parent import PARENT_FILE, SWEPT_PARAMS_TAG
from glm_ft.tracking import store
from glm_ft.errors import ConfigError, GlmFtError, to_stderr
from glm_ft.config.schema import TrackingConfig
from glm_ft.search.sweep import DEFAULT_METRIC, child_runs, is_score

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Final metrics worth a column: quality metrics and the training loss, not timings or sample counts (eval_samples,
# test_samples: the same for every run of a sweep over one data set).
NOT_COMPARED = ("runtime", "per_second", "flos", "_samples")


@dataclass
class Comparison:
    parent_id: str
    parent_name: str
    metric: str
    direction: str
    swept: list[str]
    columns: list[str]  # metric columns, the compared metric first
    rows: list[dict] = field(default_factory=list)  # best first: name, status, params{}, metrics{}
    # run id -> [(step, value), ...] of the compared metric from MLflow's metric history, a step's last value
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    plot: Path | None = None


def _client(tracking_uri: str | None):
    if tracking_uri is None:
        tracking_uri, source = store.tracking_uri(OmegaConf.structured(TrackingConfig))
    else:
        source = "--tracking-uri"
    db = store.sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"{source}: no MLflow store at {db}; run a sweep first (python train.py -m ...)")
    store.check_reachable(tracking_uri, source)
    store.import_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri), tracking_uri


def find_parent(client, experiment_id: str, sweep: str | None):
    """The sweep's parent run: by run id, by sweep folder, or the latest sweep of the experiment."""
    if sweep and RUN_ID.match(sweep):
        return client.get_run(sweep)
    if sweep:
        folder = Path(sweep).expanduser().resolve()
        marker = folder / PARENT_FILE
        if marker.is_file():
            return client.get_run(marker.read_text(encoding="utf-8").strip())
        found = client.search_runs([experiment_id], filter_string=f"tags.`glm_ft.sweep_dir` = '{folder}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise ConfigError(f"--sweep: no sweep run for '{sweep}' (neither a run id nor a sweep folder "
                              f"with {PARENT_FILE})")
        return found[0]
    found = client.search_runs([experiment_id], filter_string="tags.`glm_ft.sweep` = 'true'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise ConfigError("no sweep in this experiment yet; run one: python train.py -m method.r=4,8,16")
    return found[0]


def _param(run, key: str) -> str:
    # A swept group (method=lora,ptuning_v2) has no param of its own: its choice is a tag.
    return run.data.params.get(key, run.data.tags.get(f"glm_ft.{key}", ""))


def compare(sweep: str | None = None, metric: str | None = None, experiment: str = "glm-ft",
            tracking_uri: str | None = None, out: Path | None = None) -> Comparison:
    client, uri = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment '{experiment}' in {uri}")
    parent = find_parent(client, exp.experiment_id, sweep)
    tags = parent.data.tags
    sweep_metric = tags.get("glm_ft.optimized_metric") or DEFAULT_METRIC
    metric = metric or sweep_metric
    # The sweep's direction is its optimized metric's; another --metric goes its own way (a loss down, scores up).
    direction = tags.get("glm_ft.direction", "maximize") if metric == sweep_metric else metric_direction(metric)
    children = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    if not children:
        raise ConfigError(f"sweep {parent.info.run_name} ({parent.info.run_id}) has no child runs")
    swept = json.loads(tags.get(SWEPT_PARAMS_TAG, "[]")) or sorted(
        k for k in children[0].data.params if k not in PER_RUN_PARAMS
        and len({c.data.params.get(k) for c in children}) > 1)

    scores = {k for c in children for k in c.data.metrics
              if (k.startswith(("eval_", "test_")) or k == "train_loss") and not k.endswith(NOT_COMPARED)}
    columns = sorted(scores - {metric})
    result = Comparison(parent.info.run_id, parent.info.run_name, metric, direction, swept, [metric] + columns)
    for child in children:
        # A trial stopped by its study's pruner ends KILLED with this tag (glm_ft.search.study).
        status = "PRUNED" if child.data.tags.get("glm_ft.pruned") == "true" else child.info.status
        result.rows.append({"name": child.info.run_name, "status": status, "run_id": child.info.run_id,
                            "params": {k: _param(child, k) for k in swept},
                            "metrics": {k: child.data.metrics.get(k) for k in result.columns}})
    sign = -1 if direction == "maximize" else 1
    # Runs that did not finish (pruned, killed, failed) after the finished ones, whatever their score: their last
    # value is from part of the training. A NaN is no score, with the runs that lack one: in the sort key it compares
    # neither less nor more than anything, which scrambled the whole order.
    result.rows.sort(key=lambda r: (not is_score(r["metrics"][metric]), r["status"] != "FINISHED",
                                    sign * r["metrics"][metric] if is_score(r["metrics"][metric]) else 0.0))

    if all(r["metrics"][metric] is None for r in result.rows):
        present = sorted({k for c in children for k in c.data.metrics})
        raise ConfigError(f"--metric: no run of sweep {parent.info.run_name} has '{metric}' "
                          f"(its runs have: {', '.join(present) or 'no metrics'})")
    for row in result.rows:
        history = client.get_metric_history(row["run_id"], metric) if row["metrics"][metric] is not None else []
        result.curves[row["run_id"]] = last_per_step(history)
    print(format_table(result))
    scored = [r["metrics"][metric] for r in result.rows if is_score(r["metrics"][metric])]
    if not scored:
        raise ConfigError(f"--metric: no run of sweep {parent.info.run_name} has a finite '{metric}' (only NaN or "
                          "infinite values)")
    if len(scored) > 1 and len(set(scored)) == 1:
        # Nothing to choose: say so rather than star an arbitrary "best" run.
        print(f"all scored runs tie at {metric}={scored[0]:.4g}: the swept values made no difference here")
    result.plot = out or _plot_path(tags.get("glm_ft.sweep_dir"), parent.info.run_id, metric)
    plot(result, result.plot)
    client.log_artifact(parent.info.run_id, str(result.plot))
    print(f"plot: {result.plot} (also logged to run {parent.info.run_id})")
    return result


def last_per_step(history) -> list[tuple[int, float]]:
    """[(step, value)] by step, one point per step: the one logged last. A run killed and resumed (resume=auto)
    logs the steps between its checkpoint and the kill again to the same run, and the resumed training's values are
    the run's (as MLflow's latest value, the table's, has it)."""
    latest = {}
    for point in sorted(history, key=lambda m: m.timestamp):  # stable: points of one moment keep the store's order
        latest[point.step] = point.value
    return sorted(latest.items())


def metric_direction(metric: str) -> str:
    """Which way is better for a metric compare shows: down for a loss (train_loss, eval_loss), up for the scores."""
    return "minimize" if metric.endswith("loss") else "maximize"


def significant_digits(values: list[float], least: int = 4) -> int:
    """The fewest significant digits (at least `least`) that print different values differently: a sweep's runs
    often differ in the fifth digit (train_loss 1.166366 against 1.166126), which 4 would show as equal."""
    distinct = set(values)
    return next((d for d in range(least, 18) if len({f"{v:.{d}g}" for v in distinct}) == len(distinct)), 17)


def format_table(result: Comparison) -> str:
    header = ["run", *result.swept, "status", *result.columns]
    # NaN left out: no two NaNs are equal, so they would never print as distinct and asked for all 17 digits.
    digits = {k: significant_digits([r["metrics"][k] for r in result.rows if is_score(r["metrics"][k])])
              for k in result.columns}
    lines = [[r["name"], *(r["params"][k] for k in result.swept), r["status"],
              *("-" if r["metrics"][k] is None else f"{r['metrics'][k]:.{digits[k]}g}" for k in result.columns)]
             for r in result.rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    title = (f"sweep {result.parent_name} ({result.parent_id}): {len(result.rows)} runs, "
             f"best {result.metric} first ({result.direction})")
    return "\n".join([title, fmt.format(*header), *(fmt.format(*map(str, row)) for row in lines)])


def _plot_path(sweep_dir: str | None, parent_id: str, metric: str) -> Path:
    name = f"compare_{metric_name(metric).replace('/', '_')}.png"
    if sweep_dir and Path(sweep_dir).is_dir() and os.access(sweep_dir, os.W_OK):
        return Path(sweep_dir) / name
    return Path.cwd() / f"{parent_id[:8]}_{name}"


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(result: Comparison, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(result: Comparison):
    """One panel per swept parameter (every scored run as a point, the best one starred), then one with each run's
    metric over its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = result.swept or ["run"]
    rows = [r for r in result.rows if is_score(r["metrics"][result.metric])]
    best = rows[0]
    # Constrained layout keeps the (wrapped) title, labels and legends inside the figure.
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 4.2), squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes[0], keys):
        labels = [r["params"].get(key, r["name"]) for r in rows]
        ys = [r["metrics"][result.metric] for r in rows]
        xs = _numbers(labels)
        if xs is None:  # categories (a swept group, a string): evenly spaced, in sorted order
            order = sorted(set(labels))
            xs = [order.index(label) for label in labels]
            ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        elif min(xs) > 0 and max(xs) / min(xs) >= 4:  # ranks and lengths grow in powers of two
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
            ax.minorticks_off()
        ax.scatter(xs, ys, color="tab:blue")
        bx = xs[rows.index(best)]
        ax.scatter([bx], [best["metrics"][result.metric]], marker="*", s=220, color="tab:red", label="best",
                   zorder=3)
        ax.set_xlabel(key)
        ax.set_ylabel(result.metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax = axes[0][-1]
    for row in rows:
        points = result.curves.get(row["run_id"]) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=row["name"],
                    linewidth=2.5 if row is best else 1.2)
    ax.set_xlabel("global step")
    ax.set_ylabel(result.metric)
    ax.set_title(f"{result.metric} over steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.suptitle(f"{result.metric} vs swept parameters: {result.parent_name}", fontsize=10, wrap=True)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_ft compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("--sweep", help="the sweep's parent run id or its folder (default: the latest sweep)")
    parser.add_argument("--metric", help="metric to rank by (default: the sweep's optimized_metric, else "
                                         f"{DEFAULT_METRIC})")
    parser.add_argument("--experiment", default=TrackingConfig.experiment_name, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the project's mlflow.db")
    parser.add_argument("--out", type=Path, help="where to write the PNG (default: the sweep folder)")
    args = parser.parse_args(argv)
    try:
        compare(args.sweep, args.metric, args.experiment, args.tracking_uri, args.out)
    except GlmFtError as err:
        to_stderr(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
