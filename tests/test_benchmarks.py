"""The speed suite: cases, rows, verdicts, table and JSON from made-up figures; the worker on a tiny model."""

import json
import os
from dataclasses import asdict
from datetime import datetime
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from benchmarks.__main__ import SUITES
from benchmarks.speed import select
from benchmarks.speed_cases import (
    ALL_DISK,
    COLD_ALL,
    COLD_COMPUTE,
    COLD_DECODE,
    COLD_HALF,
    DECODE_SECTION,
    GPU_HALF_CPU,
    HALF_DISK,
    LOAD_SECTION,
    MEMORY,
    Case,
    Settings,
    SuiteModels,
    cold_cases,
    comparisons,
    cpu_cases,
    gpu_cases,
    layer_map,
)
from benchmarks.speed_checkpoints import (
    BenchModel,
    converted_bytes,
    read_every_byte,
    split_evenly,
    write_random_llama,
)
from benchmarks.speed_cold import cold_rows, cold_table
from benchmarks.speed_pages import FileRange, disk_ranges, merged
from benchmarks.speed_report import CaseResult, evaluate, failures, report, rows_for, summarise, table, write_json

DEMO_FP32 = BenchModel("demo-fp32", Path("/models/demo-fp32"), "float32")
DEMO_BF16 = BenchModel("demo-bf16", Path("/models/demo-bf16"), "bfloat16")
TINYLLAMA = BenchModel("tinyllama-bf16", Path("/models/tinyllama"), "bfloat16")
LAYERS = {"demo-fp32": 30, "demo-bf16": 30, "tinyllama-bf16": 22}
BUDGET_MAP = layer_map(22, 8, "disk")


def suite_cases(tinyllama: BenchModel | None = TINYLLAMA) -> list[Case]:
    return cpu_cases(SuiteModels(DEMO_FP32, DEMO_BF16, tinyllama, BUDGET_MAP), LAYERS)


def run(**figures) -> dict:
    return dict(figures)


def decoded(tokens_per_s: float, new_tokens: int = 10, **figures) -> dict:
    """A run whose every decode step took the same time."""
    return run(decode_s=new_tokens / tokens_per_s, new_tokens=new_tokens, decode_median_step_s=1 / tokens_per_s, **figures)


def results_of(cases: list[Case], runs_by_key: dict[str, list[dict]]) -> dict[str, CaseResult]:
    return {case.key: CaseResult(case, tuple(runs_by_key.get(case.key, ()))) for case in cases}


def row_named(rows, section: str, label: str):
    return next(row for row in rows if row.section == section and row.label == label)


def test_half_disk_map_puts_the_second_half_of_the_layers_on_disk_and_the_rest_on_cpu():
    device_map = layer_map(30, 15, "disk")
    assert [device_map[f"model.layers.{i}"] for i in (0, 14, 15, 29)] == ["cpu", "cpu", "disk", "disk"]
    assert (device_map["model.embed_tokens"], device_map["model.norm"], device_map["lm_head"]) == ("cpu",) * 3


def test_every_devicemap_case_has_a_transformers_case_with_the_same_device_map_and_dtype():
    cases = {case.key: case for case in suite_cases()}
    for case in cases.values():
        if case.system == "devicemap":
            twin = cases[f"transformers/{case.model}/{case.placement}"]
            assert (twin.device_map, twin.dtype, twin.folder, twin.measures) == (
                case.device_map, case.dtype, case.folder, case.measures)


def test_the_dtype_converting_load_reads_the_fp32_checkpoint_as_bf16():
    converting = [case for case in suite_cases() if case.model == "demo-fp32-as-bf16"]
    loads = [case for case in converting if case.system in ("devicemap", "transformers")]
    assert {case.placement for case in loads} == {MEMORY, ALL_DISK}
    assert {(case.folder, case.dtype) for case in converting} == {(str(DEMO_FP32.folder), "bfloat16")}
    assert [case.system for case in converting if case not in loads] == ["read-and-fill"]


def test_every_row_names_cases_the_suite_runs():
    cases = suite_cases()
    keys = {case.key for case in cases}
    for comparison in comparisons(cases):
        assert {comparison.devicemap, comparison.transformers, comparison.reference} - {None} <= keys


def test_without_the_large_checkpoint_its_cases_and_rows_are_left_out():
    cases = suite_cases(tinyllama=None)
    assert not [case for case in cases if "tinyllama" in case.key]
    assert not [row for row in comparisons(cases) if "tinyllama" in row.devicemap]


def test_select_keeps_the_cases_whose_key_contains_any_pattern():
    chosen = select(suite_cases(), ["half-disk", "raw-read/demo-fp32"])
    assert {case.placement for case in chosen} == {HALF_DISK, "files"}
    assert select(suite_cases(), []) == suite_cases()


def test_decode_rate_is_summarised_from_the_fastest_run_and_the_median():
    result = CaseResult(suite_cases()[1], (decoded(16.0), decoded(32.0), decoded(8.0)))
    figure = summarise(result, "decode_tokens_per_s")
    assert (figure.best, figure.median, figure.runs) == (32.0, 16.0, 3)


def test_decode_rate_is_one_token_per_median_step_and_the_wall_rate_is_kept_beside_it():
    # A neighbour's burst made one step of four take 1.3 s; the median step is still 0.1 s.
    interrupted = run(decode_s=1.6, new_tokens=4, decode_median_step_s=0.1)
    result = CaseResult(suite_cases()[1], (interrupted,))
    assert summarise(result, "decode_tokens_per_s").best == pytest.approx(10.0)
    assert summarise(result, "decode_wall_tokens_per_s").best == pytest.approx(2.5)


def test_load_time_is_summarised_from_the_quickest_run():
    result = CaseResult(suite_cases()[1], (run(load_s=3.0), run(load_s=1.0)))
    assert summarise(result, "load_s").best == 1.0


def test_half_disk_decode_passes_at_96_percent_of_in_memory_speed_and_fails_at_90():
    cases = suite_cases()
    for rate, verdict in ((0.96, "pass"), (0.90, "fail")):
        results = results_of(cases, {
            "devicemap/demo-fp32/memory": [decoded(10.0)],
            "devicemap/demo-fp32/half-disk": [decoded(10.0 * rate)],
            "transformers/demo-fp32/half-disk": [decoded(5.0)],
        })
        row = row_named(rows_for(comparisons(cases), results), DECODE_SECTION, "demo fp32, 2nd half of layers on disk")
        assert row.vs_reference == pytest.approx(rate)
        assert row.vs_transformers == pytest.approx(2.0 * rate)
        assert row.verdict == verdict


def test_a_converting_load_must_beat_transformers_and_stay_within_one_and_a_half_raw_reads():
    cases = suite_cases()
    comparison = next(c for c in comparisons(cases) if c.metric == "load_s" and "demo-fp32-as-bf16/memory" in c.devicemap)
    fast = {"devicemap/demo-fp32-as-bf16/memory": [run(load_s=1.2)],
            "transformers/demo-fp32-as-bf16/memory": [run(load_s=2.0)],
            "raw-read/demo-fp32/files": [run(read_s=1.0)]}
    assert evaluate(comparison, results_of(cases, fast)).verdict == "pass"
    slow_against_the_disk = {**fast, "devicemap/demo-fp32-as-bf16/memory": [run(load_s=1.6)]}
    assert evaluate(comparison, results_of(cases, slow_against_the_disk)).verdict == "fail"


def test_a_converting_load_is_also_shown_against_reading_plus_filling_fresh_memory_without_a_target():
    cases = suite_cases()
    results = results_of(cases, {"devicemap/demo-fp32-as-bf16/memory": [run(load_s=0.3)],
                                 "read-and-fill/demo-fp32-as-bf16/files": [run(read_s=0.1, fill_s=0.1, floor_s=0.2)]})
    row = row_named(rows_for(comparisons(cases), results), LOAD_SECTION, "demo fp32 as bf16, in memory, vs read + fill")
    assert (row.reference_label, row.reference.best, row.vs_reference) == ("read + fill", 0.2, pytest.approx(1.5))
    assert (row.targets, row.verdict) == ((), "")


def test_a_row_missing_a_figure_is_not_judged_and_says_which_case_failed():
    cases = suite_cases()
    results = results_of(cases, {"transformers/demo-fp32/memory": [run(load_s=1.0)]})
    failed = CaseResult(results["devicemap/demo-fp32/memory"].case, (), "ImportError: no load")
    results["devicemap/demo-fp32/memory"] = failed
    row = row_named(rows_for(comparisons(cases), results), LOAD_SECTION, "demo fp32, in memory")
    assert (row.devicemap, row.vs_transformers, row.verdict) == (None, None, "n/a")
    assert failures(results) == ["devicemap/demo-fp32/memory: ImportError: no load"]


def test_different_greedy_tokens_between_the_systems_are_flagged():
    cases = suite_cases()
    results = results_of(cases, {
        "devicemap/demo-fp32/memory": [decoded(3.0, new_tokens=3, tokens=[1, 2, 3])],
        "transformers/demo-fp32/memory": [decoded(3.0, new_tokens=3, tokens=[1, 2, 4])],
    })
    row = row_named(rows_for(comparisons(cases), results), DECODE_SECTION, "demo fp32, in memory")
    assert row.same_tokens is False


def test_table_shows_every_row_with_its_ratio_and_target():
    cases = suite_cases()
    results = results_of(cases, {
        "devicemap/demo-fp32/memory": [decoded(16.0, load_s=0.5)],
        "transformers/demo-fp32/memory": [decoded(16.0, load_s=1.0)],
        "devicemap/demo-fp32/all-disk": [decoded(8.0)],
    })
    rows = rows_for(comparisons(cases), results)
    output = StringIO()
    Console(file=output, width=250).print(table(rows))
    text = output.getvalue()
    assert "16.00 (16.00)" not in text and "16.00" in text and "0.50" in text and "≥ 0.90 × ref" in text and "FAIL" in text
    assert text.count("demo fp32, all layers on disk") == 4  # decode, prefill, load time, load RSS


def test_json_report_holds_settings_cases_and_rows(tmp_path):
    cases = suite_cases()[:3]
    results = results_of(cases, {cases[1].key: [run(load_s=1.0)]})
    data = report(Settings(runs=1), {"cpu_count": 2}, results, rows_for(comparisons(cases), results))
    path = write_json(data, tmp_path / "results", datetime(2025, 1, 2, 3, 4, 5))
    assert path.name == "speed-20250102-030405.json"
    written = json.loads(path.read_text())
    assert written["settings"]["runs"] == 1
    assert written["cases"][cases[1].key]["runs"] == [{"load_s": 1.0}]
    assert written["cases"][cases[1].key]["case"]["device_map"] == cases[1].device_map


def test_split_evenly_keeps_the_order_and_balances_elements():
    shapes = {f"w{i}": (10,) for i in range(10)}
    groups = split_evenly(shapes, 5)
    assert [name for group in groups for name in group] == list(shapes)
    assert [len(group) for group in groups] == [2] * 5


def test_random_llama_checkpoint_is_sharded_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": False}
    write_random_llama(tmp_path, shape, shard_count=3)
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    assert torch.equal(model.model.norm.weight, torch.ones(32, dtype=torch.bfloat16))
    assert read_every_byte(tmp_path) == sum(path.stat().st_size for path in tmp_path.glob("*.safetensors"))


def test_one_entry_knows_every_suite():
    assert set(SUITES) == {"speed", "plan", "pipeline", "gpu"}


def test_a_run_of_transformers_cases_alone_still_has_their_rows():
    only_transformers = select(suite_cases(), ["transformers/"])
    rows = comparisons(only_transformers)
    assert rows and {row.transformers for row in rows} <= {case.key for case in only_transformers}
    assert len({(row.section, row.label) for row in rows}) == len(rows)


def test_transformers_offload_ratio_is_taken_to_its_own_in_memory_speed():
    cases = suite_cases()
    results = results_of(cases, {
        "devicemap/demo-fp32/memory": [decoded(10.0)],
        "transformers/demo-fp32/memory": [decoded(5.0)],
        "transformers/demo-fp32/half-disk": [decoded(2.5)],
    })
    row = row_named(rows_for(comparisons(cases), results), DECODE_SECTION, "demo fp32, 2nd half of layers on disk")
    assert row.transformers_vs_reference == pytest.approx(0.5)


def test_gpu_cases_stream_the_second_half_from_cpu_and_compare_with_the_copy_bound():
    cases = gpu_cases(TINYLLAMA, 22, offloaded_bytes=10**9)
    streamed = {case.system: case for case in cases if case.placement == GPU_HALF_CPU}
    assert streamed["devicemap"].device_map == streamed["transformers"].device_map
    assert [streamed["devicemap"].device_map[f"model.layers.{i}"] for i in (0, 10, 11, 21)] == [0, 0, "cpu", "cpu"]
    assert streamed["h2d"].offloaded_bytes == 10**9 and all(case.gpu for case in cases)
    results = results_of(cases, {
        "devicemap/tinyllama-bf16/gpu-half-cpu": [decoded(10.0)],
        "h2d/tinyllama-bf16/gpu-half-cpu": [run(h2d_bytes_per_s=25e9, bound_tokens_per_s=25.0)],
    })
    row = row_named(rows_for(comparisons(cases), results), DECODE_SECTION, "tinyllama bf16, 2nd half of layers CPU→GPU")
    assert (row.reference_label, row.vs_reference) == ("H2D bound", pytest.approx(0.4))


def test_worker_times_both_systems_on_one_map_and_they_generate_the_same_tokens(tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate for a device map: pip install -e .[bench]")
    from benchmarks.speed_worker import measure

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    write_random_llama(tmp_path, shape, shard_count=2)
    settings = {"new_tokens": 4, "decode_prompt_tokens": 3, "prefill_tokens": 5, "prefill_tries": 2}
    figures = {}
    for system in ("devicemap", "transformers"):
        case = Case(system, "tiny", str(tmp_path), HALF_DISK, "bfloat16", layer_map(2, 1, "disk"), ("decode", "prefill"))
        figures[system] = measure(asdict(case), settings)
    for measured in figures.values():
        assert {"load_s", "load_peak_rss_bytes", "decode_s", "prefill_s", "peak_rss_bytes"} <= set(measured)
        assert measured["new_tokens"] == 4 and len(measured["tokens"]) == 4
        assert len(measured["decode_steps_s"]) == 3 and len(measured["prefill_tries_s"]) == 2
    assert figures["devicemap"]["tokens"] == figures["transformers"]["tokens"]


def test_worker_loads_with_devicemap_alone_and_reads_and_fills_the_floor_of_a_converting_load(tmp_path):
    from benchmarks.speed_worker import measure

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    write_random_llama(tmp_path, shape, shard_count=2)
    settings = {"new_tokens": 2, "decode_prompt_tokens": 3, "prefill_tokens": 5, "prefill_tries": 1}
    loaded = measure(asdict(Case("devicemap", "tiny-as-fp32", str(tmp_path), MEMORY, "float32", "cpu", ("decode",))),
                     settings)
    assert loaded["load_s"] > 0 and len(loaded["tokens"]) == 2
    floor = measure(asdict(Case("read-and-fill", "tiny-as-fp32", str(tmp_path), "files", "float32")), settings)
    stored_bytes = sum(path.stat().st_size for path in tmp_path.glob("*.safetensors"))
    assert floor["fill_bytes"] == converted_bytes(tmp_path, "float32") == 2 * converted_bytes(tmp_path, "bfloat16")
    assert converted_bytes(tmp_path, "bfloat16") < stored_bytes  # the files also hold their headers
    assert floor["floor_s"] == pytest.approx(floor["read_s"] + floor["fill_s"])


def cold_run(step_s: float, read_bytes: float) -> dict:
    return run(cold_step_s=step_s, cold_read_bytes_per_token=read_bytes)


def test_cold_cases_put_both_systems_on_one_map_beside_the_disks_read_speed_and_the_compute():
    cases = {case.key: case for case in cold_cases(TINYLLAMA, 22)}
    assert set(cases) == {
        "cold-read/tinyllama-bf16/files", f"plain/tinyllama-bf16/{COLD_COMPUTE}",
        *(f"{system}/tinyllama-bf16/{placement}" for system in ("devicemap", "transformers")
          for placement in (COLD_ALL, COLD_HALF)),
    }  # fmt: skip
    for placement, first_on_disk in ((COLD_ALL, 0), (COLD_HALF, 11)):
        ours, theirs = cases[f"devicemap/tinyllama-bf16/{placement}"], cases[f"transformers/tinyllama-bf16/{placement}"]
        assert ours.device_map == theirs.device_map == layer_map(22, first_on_disk, "disk")
        assert ours.measures == theirs.measures == (COLD_DECODE,)
    assert select(list(cases.values()), ["cold"]) == list(cases.values())
    assert not select(suite_cases(), ["cold"]), "the warm suite has no cold case"
    assert not [row for row in comparisons(list(cases.values())) if "cold" in row.devicemap], "a table of their own"


def test_a_cold_row_takes_the_ideal_from_the_disk_floor_or_the_compute_whichever_is_longer():
    cases = cold_cases(TINYLLAMA, 22)
    results = results_of(cases, {
        "cold-read/tinyllama-bf16/files": [run(cold_read_bytes_per_s=1e9), run(cold_read_bytes_per_s=2e9)],
        f"plain/tinyllama-bf16/{COLD_COMPUTE}": [decoded(8.0)],
        f"devicemap/tinyllama-bf16/{COLD_ALL}": [cold_run(1.5, 2e9), cold_run(1.1, 2e9)],
        f"transformers/tinyllama-bf16/{COLD_ALL}": [cold_run(1.6, 2e9)],
        f"devicemap/tinyllama-bf16/{COLD_HALF}": [cold_run(0.25, 1e8)],
    })  # fmt: skip
    every_layer, half = cold_rows(results)
    ours = every_layer.devicemap
    assert (ours.floor_s, ours.compute_s, ours.ideal_s) == (1.0, 0.125, 1.0), "the fastest read speed: the hardest floor"
    assert ours.achieved == pytest.approx(1.0 / 1.1) and every_layer.vs_transformers == pytest.approx(1.6 / 1.1)
    assert every_layer.verdict == "pass"
    assert (half.devicemap.ideal_s, half.devicemap.achieved) == (0.125, 0.5), "compute-bound: the compute is the ideal"
    assert (half.transformers, half.verdict) == (None, "fail")


def test_cold_all_disk_fails_below_one_point_three_times_transformers_even_at_the_ideal():
    cases = cold_cases(TINYLLAMA, 22)
    results = results_of(cases, {
        "cold-read/tinyllama-bf16/files": [run(cold_read_bytes_per_s=2e9)],
        f"plain/tinyllama-bf16/{COLD_COMPUTE}": [decoded(8.0)],
        f"devicemap/tinyllama-bf16/{COLD_ALL}": [cold_run(1.0, 2e9)],
        f"transformers/tinyllama-bf16/{COLD_ALL}": [cold_run(1.2, 2e9)],
    })  # fmt: skip
    row, half = cold_rows(results)
    assert row.devicemap.achieved == 1.0 and row.verdict == "fail"
    assert (half.devicemap, half.verdict) == (None, "n/a"), "run, but with nothing measured"
    output = StringIO()
    Console(file=output, width=250).print(cold_table([row]))
    assert "≥ 0.85 × ideal; ≥ 1.30 × tf" in output.getvalue() and "FAIL" in output.getvalue()


def test_merged_ranges_join_neighbours_in_one_file_only():
    ranges = [FileRange("a", 10, 20), FileRange("b", 20, 30), FileRange("a", 20, 25), FileRange("a", 30, 40)]
    assert merged(ranges) == (FileRange("a", 10, 25), FileRange("a", 30, 40), FileRange("b", 20, 30))


def test_disk_ranges_are_the_bytes_of_the_tensors_the_map_puts_on_disk(tmp_path):
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    write_random_llama(tmp_path, shape, shard_count=1)
    ranges = disk_ranges(tmp_path, layer_map(2, 1, "disk"))
    # bf16: q and o 32×32, k and v 16×32 (2 of 4 heads), three 32×64 MLP weights, two norms of 32
    layer_bytes = 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64 + 2 * 32)
    assert sum(item.end - item.start for item in ranges) == layer_bytes
    assert len(merged(ranges)) == 1, "one layer's tensors lie next to each other"


def test_worker_decodes_cold_with_both_systems_and_counts_the_bytes_read(tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate for a device map: pip install -e .[bench]")
    from benchmarks.speed_worker import measure

    shape = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    write_random_llama(tmp_path, shape, shard_count=1)
    for path in tmp_path.glob("*.safetensors"):
        with path.open("rb") as file:
            os.fsync(file.fileno())  # only clean pages leave the page cache
    settings = {"new_tokens": 3, "decode_prompt_tokens": 3, "prefill_tokens": 5, "prefill_tries": 1, "cold_tokens": 4}
    figures = {}
    for system in ("devicemap", "transformers"):
        case = Case(system, "tiny", str(tmp_path), COLD_ALL, "bfloat16", layer_map(2, 0, "disk"), (COLD_DECODE,))
        figures[system] = measure(asdict(case), settings)
    on_disk = sum(item.end - item.start for item in merged(disk_ranges(tmp_path, layer_map(2, 0, "disk"))))
    for measured in figures.values():
        assert len(measured["cold_steps_s"]) == len(measured["cold_reads_bytes"]) == 3
        assert measured["cold_step_s"] > 0 and 0 < measured["cold_read_bytes_per_token"] <= on_disk + 2**21
    assert figures["devicemap"]["tokens"] == figures["transformers"]["tokens"]
    read = measure(asdict(Case("cold-read", "tiny", str(tmp_path), "files", "bfloat16")), settings)
    assert read["disk_read_bytes"] > 0 and read["cold_read_bytes_per_s"] > 0
