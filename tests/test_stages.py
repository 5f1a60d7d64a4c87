"""The pipeline's stage split against a brute force over every split into non-empty stages."""

from hypothesis import given, settings
from hypothesis import strategies as st

from brute_force import best_stage_split, decode_step_bytes, stage_units
from devicemap.errors import DoesNotFitError
from devicemap.planning.stages import split_stages
from devicemap.workload import Workload
from synthetic import MAX_TOKENS, need_bytes, profiles


@st.composite
def stage_cases(draw):
    profile = draw(profiles())
    workload = Workload(
        batch_size=draw(st.integers(1, 3)),
        max_tokens=draw(st.sampled_from(MAX_TOKENS)),
        kv_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
    )
    ranks = draw(st.integers(1, min(4, len(profile.blocks))))
    scale = need_bytes(profile, workload)
    budgets = [scale * draw(st.integers(5, 110)) // 100 + 1 for _ in range(ranks)]
    return profile, budgets, workload


@settings(max_examples=200, deadline=None)
@given(stage_cases())
def test_stages_are_found_whenever_a_split_fits_and_the_slowest_reads_the_fewest_bytes_per_step(case):
    profile, budgets, workload = case
    resolved = workload.resolve(profile.max_context, profile.dtype)
    units = stage_units(profile, len(budgets), resolved)
    step_bytes = decode_step_bytes(units, resolved)
    best = best_stage_split(units, step_bytes, budgets, resolved.batch_size * resolved.max_tokens)
    try:
        plan = split_stages(profile, budgets, workload)
    except DoesNotFitError:
        assert best is None
        return
    assert best is not None
    assert all(stage.used_bytes <= stage.budget_bytes for stage in plan.stages)
    reads = dict(zip((unit.name for unit in units), step_bytes))
    slowest = max(sum(reads.get(block, 0) for block in stage.blocks) for stage in plan.stages)
    assert slowest == best
