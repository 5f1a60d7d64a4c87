"""Pipelined generation on one rank: micro-batches flow through the stages, round after round.

The batch is split into micro-batches. Every rank walks the active micro-batches in the
same order, one pass each per round: stage 0 embeds (the prompt, then each token the last
stage sends back), middle stages transform, the last stage samples and sends the tokens
to stage 0. Sends are asynchronous, so while stage s+1 works on micro-batch m, stage s
already works on m+1; with at least as many micro-batches as stages every stage is busy,
in prefill and in decode alike. Receives are posted a pass ahead, so a message moves the
moment its sender has it. Each micro-batch keeps its own KV cache on each stage.

Padding, positions and stopping follow transformers' ``generate`` exactly, so greedy
output is token for token that of the single-process model on the same padded batch:
positions count real tokens only, the attention mask is dropped when nothing is padded,
and a sequence that has produced an EOS token continues with the pad token until the
whole micro-batch has stopped.
"""

import json
from dataclasses import asdict, dataclass

import torch
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..errors import DeviceMapError
from .stage_model import StageModel
from .wire import StageLinks


@dataclass(frozen=True)
class Sampling:
    """How the last stage picks tokens: greedy argmax, or sampling with a seed.

    Each sequence samples from its own generator, seeded from ``seed`` and its row, so a
    seed gives the same text whatever the number of stages or micro-batches.

    >>> Sampling(do_sample=True, temperature=0.7, top_p=0.9, seed=1).do_sample
    True
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise DeviceMapError(
                f"temperature {self.temperature!r} must be more than 0; use do_sample=False for greedy"
            )
        if self.top_k is not None and self.top_k < 1:
            raise DeviceMapError(f"top_k {self.top_k!r} must be at least 1, or None to keep every token")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DeviceMapError(f"top_p {self.top_p!r} must be in (0, 1], or None to keep every token")


@dataclass(frozen=True)
class Request:
    """One generate call as every rank receives it: a left-padded batch and how to continue it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    micro_batches: int
    sampling: Sampling = Sampling()

    def to_json(self) -> str:
        """The request as one line of JSON (token ids as lists), for a worker's control pipe."""
        return json.dumps(
            {
                "input_ids": self.input_ids.tolist(),
                "attention_mask": self.attention_mask.tolist(),
                "max_new_tokens": self.max_new_tokens,
                "eos_token_ids": list(self.eos_token_ids),
                "pad_token_id": self.pad_token_id,
                "micro_batches": self.micro_batches,
                "sampling": asdict(self.sampling),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Request":
        fields = json.loads(text)
        return cls(
            input_ids=torch.tensor(fields["input_ids"], dtype=torch.int64),
            attention_mask=torch.tensor(fields["attention_mask"], dtype=torch.int64),
            max_new_tokens=fields["max_new_tokens"],
            eos_token_ids=tuple(fields["eos_token_ids"]),
            pad_token_id=fields["pad_token_id"],
            micro_batches=fields["micro_batches"],
            sampling=Sampling(**fields["sampling"]),
        )


def micro_batch_rows(batch_size: int, micro_batches: int) -> list[range]:
    """Contiguous row ranges, as even as possible, at most ``micro_batches`` of them.

    >>> micro_batch_rows(8, 3)
    [range(0, 3), range(3, 6), range(6, 8)]
    """
    count = max(1, min(micro_batches, batch_size))
    size, larger = divmod(batch_size, count)
    rows, start = [], 0
    for index in range(count):
        stop = start + size + (index < larger)
        rows.append(range(start, stop))
        start = stop
    return rows


class _Sampler:
    """The last stage's token choice for one micro-batch, and which of its sequences go on."""

    def __init__(self, request: Request, rows: range, device: torch.device):
        self.request = request
        self.unfinished = torch.ones(len(rows), dtype=torch.bool, device=device)
        self.eos = torch.tensor(request.eos_token_ids, dtype=torch.int64, device=device)
        sampling = request.sampling
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1.0 else []
        if sampling.top_k is not None:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators = _row_generators(sampling.seed, rows, device) if sampling.do_sample else []

    def next_tokens(self, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        """The tokens for ``logits`` [batch, vocab] at generation step ``step``, and whether to go on."""
        if self.request.sampling.do_sample:
            scores = logits
            for warper in self.warpers:
                scores = warper(None, scores)
            probabilities = torch.softmax(scores, dim=-1)
            rows = zip(probabilities, self.generators)
            tokens = torch.cat([torch.multinomial(row, 1, generator=generator) for row, generator in rows])
        else:
            tokens = logits.argmax(dim=-1)
        tokens = torch.where(self.unfinished, tokens, self.request.pad_token_id)
        self.unfinished &= ~torch.isin(tokens, self.eos)
        keep_going = bool(self.unfinished.any()) and step + 1 < self.request.max_new_tokens
        return tokens, keep_going


def _row_generators(seed: int, rows: range, device: torch.device) -> list[torch.Generator]:
    seeds = torch.randint(2**62, (rows.stop,), generator=torch.Generator().manual_seed(seed))
    return [torch.Generator(device).manual_seed(int(seeds[row])) for row in rows]


class _MicroBatch:
    """One micro-batch as one rank sees it: its inputs, mask, positions, cache and progress."""

    def __init__(self, request: Request, rows: range, stage: StageModel, keep_mask: bool):
        device = stage.device
        self.size = len(rows)
        self.input_ids = request.input_ids[rows.start : rows.stop].to(device)
        mask = request.attention_mask[rows.start : rows.stop].to(device)
        positions = mask.cumsum(-1) - 1
        self.position_ids = positions.masked_fill(mask == 0, 0)
        self.attention_mask = mask if keep_mask else None
        self.prompt_tokens = self.input_ids.shape[1]
        self.cache = stage.new_cache()
        self.sampler = _Sampler(request, rows, device) if stage.layout.head else None
        self.new_tokens: list[torch.Tensor] = []
        self.step = 0

    def extend(self) -> None:
        """Make room for one more token: the mask grows by one, the positions move on by one."""
        self.position_ids = self.position_ids[:, -1:] + 1
        if self.attention_mask is not None:
            ones = self.attention_mask.new_ones((self.size, 1))
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)


def run_request(stage: StageModel, links: StageLinks, request: Request) -> torch.Tensor | None:
    """Run one request through this rank's stage, in step with the other ranks.

    Stage 0 returns the new tokens [batch, steps] (sequences that stopped early padded with
    the pad token); the other ranks return None.
    """
    keep_mask = not bool((request.attention_mask == 1).all())
    batches = [
        _MicroBatch(request, rows, stage, keep_mask)
        for rows in micro_batch_rows(request.input_ids.shape[0], request.micro_batches)
    ]
    for batch in batches:
        _expect(batch, stage, links, step=0)
    active = list(batches)
    while active:
        active = [batch for batch in active if _advance(batch, stage, links)]
    links.flush()
    if links.rank != 0:
        return None
    return _collect(batches, request.pad_token_id)


def _advance(batch: _MicroBatch, stage: StageModel, links: StageLinks) -> bool:
    """One pass of ``batch`` through this stage; False once the micro-batch has stopped."""
    is_last = links.rank == links.last
    if links.rank == 0 and batch.step == 0:
        inputs = batch.input_ids
    elif links.rank == 0:
        tokens, keep_going = links.recv_tokens()
        batch.new_tokens.append(tokens)
        if not keep_going:
            _pass_stop(batch, stage, links, is_last)
            return False
        inputs = tokens[:, None]
    else:
        inputs = links.recv_hidden()
        if inputs is None:
            _pass_stop(batch, stage, links, is_last)
            return False
    if batch.step > 0:
        batch.extend()
    _expect(batch, stage, links, step=batch.step + 1)
    output = stage.forward(inputs, batch.attention_mask, batch.position_ids, batch.cache)
    if is_last:
        tokens, keep_going = batch.sampler.next_tokens(output, batch.step)
        links.send_tokens(tokens, keep_going)
    else:
        links.send_hidden(output)
    batch.step += 1
    return True


def _expect(batch: _MicroBatch, stage: StageModel, links: StageLinks, step: int) -> None:
    """Post the receive of the message that starts ``batch``'s pass at ``step`` on this rank.

    It is posted before this rank computes, a pass early, so that the sender hands the
    message over the moment it is ready instead of waiting to be asked (see ``wire``).
    """
    if links.rank == 0 and step > 0:
        links.expect_tokens(batch.size)
    elif links.rank > 0:
        tokens = batch.prompt_tokens if step == 0 else 1
        links.expect_hidden(batch.size, tokens, stage.hidden_size, stage.dtype)


def _pass_stop(batch: _MicroBatch, stage: StageModel, links: StageLinks, is_last: bool) -> None:
    if not is_last:
        links.send_stop(batch.size, stage.hidden_size, stage.dtype)


def _collect(batches: list[_MicroBatch], pad_token_id: int) -> torch.Tensor:
    steps = max(len(batch.new_tokens) for batch in batches)
    rows = []
    for batch in batches:
        tokens = torch.stack(batch.new_tokens, dim=1).cpu()
        padding = torch.full((batch.size, steps - tokens.shape[1]), pad_token_id, dtype=tokens.dtype)
        rows.append(torch.cat([tokens, padding], dim=1))
    return torch.cat(rows)
