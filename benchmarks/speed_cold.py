"""The cold rows: decoding with disk blocks that are not in memory, against what the disk and the compute allow.

A token cannot take less than the time to read the bytes it reads from disk at the
disk's cold sequential speed (the disk floor), nor less than the plain model's compute
per token in memory; ideal = max(compute, disk floor), and achieved ÷ ideal is the share
of it a system reaches. Pure: rows come from plain dicts of run results.
"""

from dataclasses import dataclass

from rich.table import Table

from .speed_cases import COLD_ALL, COLD_COMPUTE, COLD_HALF, PLACEMENT_LABELS, Target
from .speed_report import CaseResult, verdict

COLD_TARGETS = {
    COLD_ALL: (Target("reference", 0.85, at_most=False), Target("transformers", 1.3, at_most=False)),
    COLD_HALF: (Target("reference", 0.85, at_most=False),),
}


@dataclass(frozen=True)
class ColdFigures:
    """One system's cold decoding, from its fastest run, against the ideal."""

    tokens_per_s: float
    read_bytes_per_token: float
    floor_s: float
    compute_s: float

    @property
    def ideal_s(self) -> float:
        return max(self.compute_s, self.floor_s)

    @property
    def achieved(self) -> float:
        """The share of the ideal reached: ideal seconds per token ÷ seconds per token."""
        return self.ideal_s * self.tokens_per_s


@dataclass(frozen=True)
class ColdRow:
    """Both systems on one map, devicemap ÷ transformers, and whether the targets are met."""

    label: str
    devicemap: ColdFigures | None
    transformers: ColdFigures | None
    vs_transformers: float | None
    targets: tuple[Target, ...]
    verdict: str


def cold_figures(
    result: CaseResult | None, read_bytes_per_s: float | None, compute_s: float | None
) -> ColdFigures | None:
    """A cold case's figures from its fastest run; None when it, the read speed or the compute is missing.

    >>> cold_figures(CaseResult(None, ({"cold_step_s": 2.0, "cold_read_bytes_per_token": 2e9},)), 2e9, 0.1).achieved
    0.5
    """
    runs = [run for run in result.runs if "cold_step_s" in run] if result is not None else []
    if not runs or not read_bytes_per_s or compute_s is None:
        return None
    fastest = min(runs, key=lambda run: run["cold_step_s"])
    read = fastest["cold_read_bytes_per_token"]
    return ColdFigures(1 / fastest["cold_step_s"], read, read / read_bytes_per_s, compute_s)


def cold_rows(results: dict[str, CaseResult]) -> list[ColdRow]:
    """A row for each cold placement either system ran, with the read speed and compute the run measured.

    >>> cold_rows({})
    []
    """
    rows = []
    for placement, targets in COLD_TARGETS.items():
        keys = {system: _key(results, system, placement) for system in ("devicemap", "transformers")}
        if not any(keys.values()):
            continue
        model = next(key for key in keys.values() if key).split("/")[1]
        read_speed = _best(results.get(f"cold-read/{model}/files"), "cold_read_bytes_per_s", max)
        compute_s = _best(results.get(f"plain/{model}/{COLD_COMPUTE}"), "decode_median_step_s", min)
        ours, theirs = (cold_figures(results.get(keys[system]), read_speed, compute_s) for system in keys)
        versus = ours.tokens_per_s / theirs.tokens_per_s if ours and theirs else None
        ratios = {"reference": ours.achieved if ours else None, "transformers": versus}
        label = f"{model.replace('-', ' ')}, {PLACEMENT_LABELS[placement]}"
        rows.append(ColdRow(label, ours, theirs, versus, targets, verdict(targets, ratios)))
    return rows


def cold_table(rows: list[ColdRow]) -> Table:
    """The cold rows: one line per system, the ratio and the verdict on devicemap's."""
    view = Table(title="disk offload, cold (pages dropped before every decode step)", title_justify="left")
    for column in ("case", "system", "tokens/s", "GB read / token", "disk floor, s", "compute, s", "ideal, s",
                   "÷ ideal", "dm ÷ tf", "target", "result"):
        view.add_column(column, justify="left" if column in ("case", "system", "target") else "right")
    for row in rows:
        result = {"pass": "[green]pass[/green]", "fail": "[red]FAIL[/red]", "n/a": "n/a"}[row.verdict]
        targets = "; ".join(target.describe().replace("ref", "ideal") for target in row.targets)
        versus = "—" if row.vs_transformers is None else f"{row.vs_transformers:.2f}"
        view.add_row(row.label, "devicemap", *_cells(row.devicemap), versus, targets, result)
        view.add_row("", "transformers", *_cells(row.transformers), "", "", "")
    return view


def _cells(figures: ColdFigures | None) -> tuple[str, ...]:
    if figures is None:
        return ("—",) * 6
    return (
        f"{figures.tokens_per_s:.2f}",
        f"{figures.read_bytes_per_token / 1e9:.2f}",
        f"{figures.floor_s:.3f}",
        f"{figures.compute_s:.3f}",
        f"{figures.ideal_s:.3f}",
        f"{figures.achieved:.2f}",
    )


def _key(results: dict[str, CaseResult], system: str, placement: str) -> str | None:
    return next((key for key in results if key.startswith(f"{system}/") and key.endswith(f"/{placement}")), None)


def _best(result: CaseResult | None, metric: str, choose) -> float | None:
    values = [run[metric] for run in result.runs if metric in run] if result is not None else []
    return choose(values) if values else None
