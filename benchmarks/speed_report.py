"""Turn the runs' raw figures into the table's rows, print them, and write them as JSON.

Pure apart from ``write_json``: rows are computed from plain dicts of run results,
so the table can be checked without timing anything.
"""

import json
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from rich.table import Table

from .speed_cases import Case, Comparison, Settings, Target

HIGHER_IS_BETTER = {"decode_tokens_per_s", "decode_wall_tokens_per_s", "bound_tokens_per_s", "h2d_bytes_per_s"}


@dataclass(frozen=True)
class CaseResult:
    """Every run of one case: each run's figures by metric name, or why the case failed."""

    case: Case
    runs: tuple[dict, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Figure:
    """One metric of one case over its runs: the best run, the median, how many runs."""

    best: float
    median: float
    runs: int


@dataclass(frozen=True)
class Row:
    """A comparison with its figures, ratios (devicemap ÷ other, best runs) and verdict."""

    section: str
    label: str
    metric: str
    devicemap: Figure | None
    transformers: Figure | None
    reference: Figure | None
    reference_label: str
    reference_metric: str
    vs_transformers: float | None
    vs_reference: float | None
    transformers_vs_reference: float | None
    targets: tuple[Target, ...]
    verdict: str
    same_tokens: bool | None
    note: str = ""


def with_derived_metrics(run: dict) -> dict:
    """A run's figures plus the decode rates computed from them.

    ``decode_tokens_per_s`` is one token per median step, steady under a neighbour's
    bursts; ``decode_wall_tokens_per_s`` is the new tokens over the wall time.

    >>> with_derived_metrics({"decode_s": 2.0, "new_tokens": 64, "decode_median_step_s": 0.025})["decode_tokens_per_s"]
    40.0
    """
    derived = dict(run)
    if "decode_s" in run:
        derived["decode_wall_tokens_per_s"] = run["new_tokens"] / run["decode_s"]
        derived["decode_tokens_per_s"] = 1 / run["decode_median_step_s"]
    return derived


def summarise(result: CaseResult | None, metric: str) -> Figure | None:
    """The best and median of ``metric`` over a case's runs; ``None`` if it has none.

    >>> summarise(CaseResult(case, ({"load_s": 2.0}, {"load_s": 1.0}, {"load_s": 4.0})), "load_s")  # doctest: +SKIP
    Figure(best=1.0, median=2.0, runs=3)
    """
    if result is None:
        return None
    values = [run[metric] for run in map(with_derived_metrics, result.runs) if metric in run]
    if not values:
        return None
    best = max(values) if metric in HIGHER_IS_BETTER else min(values)
    return Figure(best, statistics.median(values), len(values))


def evaluate(comparison: Comparison, results: dict[str, CaseResult]) -> Row:
    """The row of ``comparison``: figures, ratios of the best runs, and whether targets are met.

    >>> evaluate(comparison, results).verdict  # doctest: +SKIP
    'pass'
    """
    reference_metric = comparison.reference_metric or comparison.metric
    ours = summarise(results.get(comparison.devicemap), comparison.metric)
    theirs = summarise(results.get(comparison.transformers), comparison.metric)
    reference = summarise(results.get(comparison.reference), reference_metric)
    their_reference = summarise(results.get(comparison.transformers_reference or comparison.reference), reference_metric)
    ratios = {"transformers": _ratio(ours, theirs), "reference": _ratio(ours, reference)}
    return Row(
        comparison.section,
        comparison.label,
        comparison.metric,
        ours,
        theirs,
        reference,
        comparison.reference_label,
        reference_metric,
        ratios["transformers"],
        ratios["reference"],
        _ratio(theirs, their_reference),
        comparison.targets,
        verdict(comparison.targets, ratios),
        same_tokens(results, comparison) if comparison.metric == "decode_tokens_per_s" else None,
        _errors(results, comparison),
    )


def verdict(targets: tuple[Target, ...], ratios: dict[str, float | None]) -> str:
    """"pass" when every target's ratio is known and met, "fail" when one is not met, else "n/a".

    >>> verdict((Target("reference", 0.95, at_most=False),), {"reference": 0.97})
    'pass'
    """
    if not targets:
        return ""
    if any(ratios[target.against] is not None and not target.met(ratios[target.against]) for target in targets):
        return "fail"
    if any(ratios[target.against] is None for target in targets):
        return "n/a"
    return "pass"


def same_tokens(results: dict[str, CaseResult], comparison: Comparison) -> bool | None:
    """Whether every case of the row generated the same tokens (same model, same dtype, greedy)."""
    keys = (comparison.devicemap, comparison.transformers, comparison.reference)
    generated = [run["tokens"] for key in keys if key in results for run in results[key].runs[:1] if "tokens" in run]
    return None if len(generated) < 2 else all(tokens == generated[0] for tokens in generated)


def rows_for(comparisons: list[Comparison], results: dict[str, CaseResult]) -> list[Row]:
    """Every comparison evaluated."""
    return [evaluate(comparison, results) for comparison in comparisons]


def table(rows: list[Row], title: str = "devicemap vs transformers") -> Table:
    """The rows as a rich table, one section per metric, targets and verdicts beside the ratios."""
    view = Table(title=title, title_justify="left")
    for column in ("case", "devicemap best (median)", "transformers best (median)", "reference (best)",
                   "dm ÷ tf", "dm ÷ ref", "tf ÷ ref", "target", "result"):
        view.add_column(column, justify="left" if column in ("case", "reference (best)", "target") else "right")
    section = None
    for row in rows:
        if row.section != section:
            if section is not None:
                view.add_section()
            view.add_row(f"[bold]{row.section}[/bold]")
            section = row.section
        view.add_row(*row_cells(row))
    return view


def row_cells(row: Row) -> tuple[str, ...]:
    """The printed cells of one row."""
    result = {"pass": "[green]pass[/green]", "fail": "[red]FAIL[/red]", "n/a": "n/a"}.get(row.verdict, "")
    if row.same_tokens is False:
        result += " [red]tokens differ[/red]"
    if row.note:
        result += " (failed)"
    reference = f"{row.reference_label} {format_value(row.reference.best, row.reference_metric)}" if row.reference else ""
    return (
        row.label,
        _both(row.devicemap, row.metric),
        _both(row.transformers, row.metric),
        reference,
        _times(row.vs_transformers),
        _times(row.vs_reference),
        _times(row.transformers_vs_reference),
        "; ".join(target.describe() for target in row.targets),
        result,
    )


def format_value(value: float, metric: str) -> str:
    """A figure in its section's unit: seconds, tokens/s, MB (10⁶ bytes), GB/s.

    >>> format_value(353e6, "load_peak_rss_bytes")
    '353'
    """
    if metric.endswith("_bytes"):
        return f"{value / 1e6:,.0f}"
    if metric.endswith("bytes_per_s"):
        return f"{value / 1e9:.2f}"
    if metric.endswith("tokens_per_s"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def failures(results: dict[str, CaseResult]) -> list[str]:
    """One line per case that failed, with the worker's last words.

    >>> failures({"devicemap/demo-fp32/memory": CaseResult(case, (), "ImportError: no load")})  # doctest: +SKIP
    ['devicemap/demo-fp32/memory: ImportError: no load']
    """
    return [f"{key}: {result.error}" for key, result in results.items() if result.error]


def summary_line(rows: list) -> str:
    """How many targets of ``rows`` (of either table: anything with a ``verdict``) passed, failed, or could not be judged.

    >>> summary_line([])
    'targets: 0 pass, 0 fail, 0 n/a'
    """
    verdicts = [row.verdict for row in rows if row.verdict]
    return f"targets: {verdicts.count('pass')} pass, {verdicts.count('fail')} fail, {verdicts.count('n/a')} n/a"


def report(settings: Settings, environment: dict, results: dict[str, CaseResult], rows: list[Row]) -> dict:
    """Everything a run produced, as JSON-ready data."""
    return {
        "suite": "speed",
        "settings": asdict(settings),
        "environment": environment,
        "cases": {key: asdict(result) for key, result in results.items()},
        "rows": [asdict(row) for row in rows],
    }


def write_json(data: dict, folder: Path, now: datetime) -> Path:
    """Write ``data`` to ``folder/speed-<time>.json`` and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"speed-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _ratio(numerator: Figure | None, denominator: Figure | None) -> float | None:
    if numerator is None or denominator is None or denominator.best == 0:
        return None
    return numerator.best / denominator.best


def _both(figure: Figure | None, metric: str) -> str:
    if figure is None:
        return "—"
    if figure.runs == 1:
        return format_value(figure.best, metric)
    return f"{format_value(figure.best, metric)} ({format_value(figure.median, metric)})"


def _times(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def _errors(results: dict[str, CaseResult], comparison: Comparison) -> str:
    keys = (comparison.devicemap, comparison.transformers, comparison.reference)
    failed = [f"{key.split('/')[0]}: {results[key].error}" for key in keys if key in results and results[key].error]
    return "; ".join(failed)
