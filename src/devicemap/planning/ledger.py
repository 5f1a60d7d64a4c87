"""What each device must hold for a placement: weights, buffers and the workload's reserves.

One accounting, used both by the planner while it searches and by a finished Plan's
ledger, so that what is planned and what is reported can never disagree.
"""

from dataclasses import dataclass

from ..model.profile import Block, Profile
from ..units import format_size
from ..workload import Workload, dtype_bytes

LOGITS_BYTES_PER_VALUE = 4  # generate keeps the last position's logits in float32
LOGITS_COPIES = 2  # the logits and the processed scores are alive together
STREAM_COPIES = 2  # the block computing now and the next one being fetched
MASK_BYTES_PER_PAIR = 1  # transformers' boolean attention mask, one byte per query × key
# A whole prompt's sliding-window mask is built as causal & window (& padding), one full-size
# boolean tensor per step: the result so far, the next term and their "and" are alive together.
MASK_COPIES = 3


@dataclass(frozen=True)
class Unit:
    """A block priced for one workload, with the tied blocks that must follow it."""

    blocks: tuple[Block, ...]
    weight_bytes: int
    buffer_bytes: int
    kv_bytes_per_token: float
    fixed_kv_bytes: int
    activation_bytes: int
    logits_bytes: int
    prompt_kv_bytes: int = 0
    mask_bytes: int = 0

    @property
    def name(self) -> str:
        return self.blocks[0].name

    @property
    def transient_bytes(self) -> int:
        """What computing the unit allocates and frees again: activations, logits, a window's prompt and mask."""
        return self.activation_bytes + self.logits_bytes + self.prompt_kv_bytes + self.mask_bytes


def price_units(profile: Profile, workload: Workload) -> list[Unit]:
    """The profile's blocks as units in execution order; tied followers join their leader.

    ``workload`` must be resolved (no ``None`` fields).
    """
    kv_value_bytes = dtype_bytes(workload.kv_dtype)
    followers = _followers_by_leader(profile)
    following = {name for group in followers.values() for name in group}
    by_name = {block.name: block for block in profile.blocks}
    chunk = prefill_tokens(profile, workload)
    units = []
    for block in profile.blocks:
        if block.name in following:
            continue
        members = (block, *(by_name[name] for name in followers.get(block.name, ())))
        units.append(_price(members, profile, workload, kv_value_bytes, chunk))
    return units


def _followers_by_leader(profile: Profile) -> dict[str, tuple[str, ...]]:
    order = {block.name: index for index, block in enumerate(profile.blocks)}
    followers: dict[str, tuple[str, ...]] = {}
    for group in profile.tied:
        leader, *rest = sorted(group, key=order.__getitem__)
        followers[leader] = followers.get(leader, ()) + tuple(rest)
    return followers


def prefill_tokens(profile: Profile, workload: Workload) -> int:
    """Tokens of each sequence one prefill forward takes: the workload's chunk, or the whole sequence.

    The chunk, where ``generate`` honours one and it needs less than a whole prefill: a
    chunk close to the sequence's length can need more, for the later chunks' mask and
    cache reads, than it saves on activations.

    >>> from devicemap.model.profile import Block, Profile
    >>> layer = Block("layer", 10, activation_bytes_per_token=10**5, kv_values_per_token=8, context_values_per_token=24)
    >>> toy = Profile("toy", "float32", (layer,), chunked_prefill=True)
    >>> prefill_tokens(toy, Workload(1, 8192, "float32", 2048)), prefill_tokens(toy, Workload(1, 1024, "float32", 2048))
    (2048, 1024)
    """
    chunk = workload.prefill_tokens
    if not profile.chunked_prefill or chunk >= workload.max_tokens:
        return workload.max_tokens

    def largest(tokens: int) -> int:
        blocks = profile.blocks
        return max((prefill_activation_bytes(block, workload, tokens, profile.dtype) for block in blocks), default=0)

    return chunk if largest(chunk) < largest(workload.max_tokens) else workload.max_tokens


def prefill_activation_bytes(block: Block, workload: Workload, chunk: int, load_dtype: str) -> int:
    """Transient bytes of the block's forward over a prefill chunk of ``chunk`` tokens per sequence.

    A chunk shorter than the sequence is followed by others that attend to the cache: each
    is handed a mask over every cached token, which SDPA turns into a bias at the load
    dtype, and reads the cache back (``Block.context_values_per_token``). Attention scores
    are not counted: the kernels SDPA picks with a mask never materialise them.

    >>> block = Block("layer", 0, kv_values_per_token=8, activation_bytes_per_token=100, context_values_per_token=32)
    >>> prefill_activation_bytes(block, Workload(1, 64, "float32"), 64, "float32")
    6400
    >>> prefill_activation_bytes(block, Workload(1, 64, "float32"), 16, "float32")
    14912
    """
    activations = block.activation_bytes_per_token * workload.batch_size * chunk
    if chunk >= workload.max_tokens or not block.kv_values_per_token:
        return activations
    # A sliding layer keeps its window less one token and adds the chunk to it.
    context = workload.max_tokens if block.kv_window is None else min(workload.max_tokens, block.kv_window - 1 + chunk)
    mask_bytes = chunk * context * (MASK_BYTES_PER_PAIR + dtype_bytes(load_dtype))
    cached_bytes = context * block.context_values_per_token * dtype_bytes(workload.kv_dtype)
    return activations + workload.batch_size * (mask_bytes + cached_bytes)


def _price(members: tuple[Block, ...], profile: Profile, workload: Workload, kv_value_bytes: int, chunk: int) -> Unit:
    tokens = workload.max_tokens
    kv_rate = 0.0
    prompt_kv_bytes = 0
    windowed = any(block.kv_window is not None for block in members)
    for block in members:
        cached_share = 1.0 if block.kv_window is None else min(1.0, block.kv_window / tokens)
        kv_rate += block.kv_values_per_token * kv_value_bytes * cached_share
        if block.kv_window is not None:
            past_window = max(0, min(chunk, tokens - block.kv_window))
            prompt_kv_bytes += block.kv_values_per_token * kv_value_bytes * workload.batch_size * past_window
    has_head = any(block.name == profile.head for block in members)
    return Unit(
        blocks=members,
        weight_bytes=sum(block.weight_bytes for block in members),
        buffer_bytes=sum(block.buffer_bytes for block in members),
        kv_bytes_per_token=kv_rate,
        fixed_kv_bytes=sum(block.cache_bytes(workload.batch_size, 0, workload.kv_dtype) for block in members),
        activation_bytes=max(prefill_activation_bytes(block, workload, chunk, profile.dtype) for block in members),
        logits_bytes=(
            workload.batch_size * profile.vocab_size * LOGITS_BYTES_PER_VALUE * LOGITS_COPIES if has_head else 0
        ),
        # A sliding-window layer holds what one prefill forward adds past its window while its
        # block runs: the whole prompt's keys and values, or a chunk's; only the window stays
        # after it (runtime.sliding).
        prompt_kv_bytes=prompt_kv_bytes,
        # SDPA cannot express a window as ``is_causal``, so transformers builds a boolean mask
        # over the whole prompt: a byte per query and key position, per sequence, MASK_COPIES
        # times while it is built (one copy was measured short: a 2 x 4096-token Mistral
        # prefill held 1.2x such a plan). A chunked prefill's masks are counted with its
        # activations.
        mask_bytes=MASK_COPIES * workload.batch_size * tokens * tokens if windowed and chunk >= tokens else 0,
    )


class DeviceLoad:
    """Running totals for one device as units are stored on it or executed on it.

    ``runtime_reserve_bytes`` is what the process holds there beside its tensors once it
    computes anything there (see ``devices.CUDA_RUNTIME_RESERVE_BYTES``); a device left idle
    holds none of it.
    """

    def __init__(self, budget_bytes: int, tokens: int, runtime_reserve_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.tokens = tokens
        self.runtime_reserve_bytes = runtime_reserve_bytes
        self.computes = False
        self.weight_bytes = 0
        self.buffer_bytes = 0
        self.kv_bytes_per_token = 0.0
        self.fixed_kv_bytes = 0
        self.activation_bytes = 0
        # Room to bring offloaded weights in, per device they are brought in for: each keeps its own.
        # Replaced, never changed in place, so that a shallow copy of a load is independent.
        self._streams: dict[str, int] = {}

    def store(self, unit: Unit) -> None:
        """Keep the unit's weights here."""
        self.weight_bytes += unit.weight_bytes

    def execute(self, unit: Unit) -> None:
        """Compute the unit here: its buffers, KV cache and transient activations live here."""
        self.computes = True
        self.buffer_bytes += unit.buffer_bytes
        self.kv_bytes_per_token += unit.kv_bytes_per_token
        self.fixed_kv_bytes += unit.fixed_kv_bytes
        self.activation_bytes = max(self.activation_bytes, unit.transient_bytes)

    def place(self, *units: Unit) -> None:
        """Keep the units' weights here and compute them here."""
        for unit in units:
            self.store(unit)
            self.execute(unit)

    def take(self, unit: Unit, tokens: float) -> bool:
        """Place the unit here; whether the device still fits with ``tokens`` batch×tokens cached."""
        self.place(unit)
        return self.fits(tokens)

    def stream(self, unit: Unit, for_device: str = "") -> None:
        """Make room to bring the unit's weights here from elsewhere, one computing and one arriving.

        ``for_device`` names the device that computes with them, when they only pass through
        here on their way (pinned host staging for a GPU): each such device stages through
        buffers of its own, so their rooms add up.
        """
        room = max(self._streams.get(for_device, 0), unit.weight_bytes * STREAM_COPIES)
        self._streams = {**self._streams, for_device: room}

    @property
    def stream_bytes(self) -> int:
        return sum(self._streams.values())

    @property
    def runtime_bytes(self) -> int:
        """The runtime reserve, held once the device computes: a GPU left idle gets no CUDA context."""
        return self.runtime_reserve_bytes if self.computes else 0

    def runtime_note(self) -> str:
        """The runtime reserve as the end of a message's breakdown, e.g. ", runtime reserve 896.0 MiB"; "" if none."""
        return f", runtime reserve {format_size(self.runtime_bytes)}" if self.runtime_bytes else ""

    def fixed_bytes(self) -> int:
        """Everything that does not grow with the number of cached tokens, the runtime reserve included."""
        return (
            self.weight_bytes + self.buffer_bytes + self.fixed_kv_bytes + self.activation_bytes + self.stream_bytes
            + self.runtime_bytes
        )  # fmt: skip

    def kv_bytes(self) -> int:
        return round(self.kv_bytes_per_token * self.tokens) + self.fixed_kv_bytes

    def used_bytes(self, tokens: float | None = None) -> float:
        """Bytes needed when ``tokens`` batch×tokens are cached (default: the workload's)."""
        tokens = self.tokens if tokens is None else tokens
        return self.fixed_bytes() + self.kv_bytes_per_token * tokens

    def fits(self, tokens: float | None = None) -> bool:
        return self.used_bytes(tokens) <= self.budget_bytes

    def token_capacity(self) -> float:
        """Batch×tokens of KV cache that fit beside everything else (inf when nothing is cached)."""
        room = self.budget_bytes - self.fixed_bytes()
        if self.kv_bytes_per_token == 0:
            return float("inf") if room >= 0 else 0.0
        return max(room, 0) / self.kv_bytes_per_token


def assign(loads: dict[str, DeviceLoad], unit: Unit, device: str, execution_device: str) -> None:
    """Charge a unit kept on ``device`` and computed on ``execution_device`` to the loads.

    The CPU computes disk blocks in place on the memory-mapped file, so they take no room
    beyond their file's pages. Weights streamed to an accelerator take slots there, and
    from disk they pass through pinned host buffers, so the CPU keeps room for them too.

    >>> from devicemap.model.profile import Block, Profile
    >>> from devicemap.workload import Workload
    >>> unit = price_units(Profile("toy", "float32", (Block("layer", 10),)), Workload(1, 1, "float32"))[0]
    >>> loads = {"cpu": DeviceLoad(100, 1), "disk": DeviceLoad(100, 1)}
    >>> assign(loads, unit, "disk", "cpu")
    >>> loads["cpu"].stream_bytes, loads["disk"].weight_bytes
    (0, 10)
    """
    loads[device].store(unit)
    loads[execution_device].execute(unit)
    if execution_device == "cpu":
        return
    if device != execution_device:
        loads[execution_device].stream(unit)
    if device == "disk" and "cpu" in loads:
        loads["cpu"].stream(unit, for_device=execution_device)
