"""Small random models and machines for property tests of the planner."""

from dataclasses import dataclass

from hypothesis import strategies as st

from devicemap.model.profile import Block, Profile
from devicemap.planning.ledger import price_units
from devicemap.workload import Workload

# Powers of two keep sliding-window shares (window / max_tokens) exact in floating point,
# so that a budget hypothesis puts exactly on a boundary is judged the same by every sum.
MAX_TOKENS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Case:
    profile: Profile
    budgets: dict[str, int]
    workload: Workload

    @property
    def units(self):
        return price_units(self.profile, self.resolved)

    @property
    def resolved(self) -> Workload:
        return self.workload.resolve(self.profile.max_context, self.profile.dtype)

    @property
    def tokens(self) -> int:
        return self.resolved.batch_size * self.resolved.max_tokens


def block_names(count: int) -> list[str]:
    middle = [f"model.layers.{index}" for index in range(count - 2)]
    return ["model.embed_tokens", *middle, "lm_head"]


@st.composite
def blocks(draw, name: str, weight_bytes: st.SearchStrategy[int], reserve_scale: int) -> Block:
    return Block(
        name=name,
        weight_bytes=draw(weight_bytes),
        buffer_bytes=draw(st.integers(0, 5 * reserve_scale)),
        kv_values_per_token=draw(st.sampled_from([0, 0, 1, 2, 4][: 2 + reserve_scale // 4])),
        kv_window=draw(st.none() | st.integers(1, 48)),
        state_values=draw(st.sampled_from([0, 0, 0, 3, 8][: 1 + reserve_scale // 2])),
        float32_state_values=draw(st.sampled_from([0, 0, 0, 2][: 1 + reserve_scale // 2])),
        activation_bytes_per_token=draw(st.integers(0, reserve_scale)),
    )


@st.composite
def profiles(draw, min_blocks: int = 2, max_blocks: int = 9) -> Profile:
    names = block_names(draw(st.integers(min_blocks, max_blocks)))
    tied = ((names[0], names[-1]),) if draw(st.booleans()) else ()
    # Half the models have equal layers, as real ones do; the rest any sizes at all.
    weights = st.just(draw(st.integers(1, 2000))) if draw(st.booleans()) else st.integers(1, 2000)
    # Reserves small beside the weights make offloading worth it; large ones make it useless.
    reserve_scale = draw(st.sampled_from([1, 8]))
    return Profile(
        name="random",
        dtype="float32",
        blocks=tuple(draw(blocks(name, weights, reserve_scale)) for name in names),
        tied=tied,
        head=names[-1],
        vocab_size=draw(st.integers(0, 64)),
        max_context=64,
    )


def need_bytes(profile: Profile, workload: Workload) -> int:
    """What the whole model needs on one device for the workload, a scale for budgets."""
    resolved = workload.resolve(profile.max_context, profile.dtype)
    tokens = resolved.batch_size * resolved.max_tokens
    units = price_units(profile, resolved)
    return int(
        sum(u.weight_bytes + u.buffer_bytes + u.fixed_kv_bytes + u.kv_bytes_per_token * tokens for u in units)
        + max(u.transient_bytes for u in units)
    )


@st.composite
def cases(draw, gpus=st.integers(1, 4), cpu=st.booleans(), disk=st.booleans(), min_blocks: int = 2) -> Case:
    profile = draw(profiles(min_blocks))
    workload = Workload(
        batch_size=draw(st.integers(1, 3)),
        max_tokens=draw(st.sampled_from(MAX_TOKENS)),
        kv_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
    )
    scale = need_bytes(profile, workload)
    count = draw(gpus)
    budgets = {f"cuda:{i}": scale * draw(st.integers(5, 110)) // 100 + 1 for i in range(count)}
    weights = sum(block.weight_bytes for block in profile.blocks)
    if count == 0:
        budgets["cpu"] = scale * draw(st.integers(5, 110)) // 100 + 1
    elif draw(cpu):
        budgets["cpu"] = weights * draw(st.integers(0, 120)) // 100 + 1
    if draw(disk):
        budgets["disk"] = weights * draw(st.integers(0, 120)) // 100 + 1
    return Case(profile, budgets, workload)
