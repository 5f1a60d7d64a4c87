"""What pipeline ranks send each other: raw tensors of sizes the receiver knows in advance.

Stage s sends stage s+1 the hidden states of one micro-batch (or a stop notice); the last
stage sends stage 0 the tokens it sampled and whether the micro-batch goes on. Nothing is
pickled on the wire: a hidden-state message is one byte tensor, a small int64 header
(kind and shape, checked on arrival) followed by the states, and a token message is int64
token ids followed by the go-on flag, so a rank never unpickles what a peer sent.

Receives are posted before the message is sent: gloo holds a send until the receiver has
posted its buffer, and when that happens late the sender's communication thread must wake
up to answer, a round trip on every step while both cores compute. So every message of a
micro-batch, the stop notice included, has the size its receiver posted for it, and a
rank posts the receive of a micro-batch's next message as soon as the current one arrives.
Every wait is bounded by the process group's timeout, and a peer that dies or stops
answering becomes a :class:`PeerLostError` naming it.
"""

import math
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import PipelineError

_HIDDEN = 1
_STOP = 0
_HEADER_VALUES = 4  # kind, batch, tokens, hidden size
_HEADER_BYTES = _HEADER_VALUES * 8


class PeerLostError(PipelineError):
    """This rank stopped because a peer died, closed its connection or stopped answering."""

    def __init__(self, message: str, peer: int):
        super().__init__(message)
        self.peer = peer


@dataclass(frozen=True)
class _Posted:
    """A receive already posted: the buffer the message lands in and what it is expected to hold."""

    work: dist.Work
    message: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype


class StageLinks:
    """The links of one rank: from the previous stage, to the next, and the token ring.

    Sends are asynchronous, so a stage computes its next micro-batch while the last one
    is still on the wire; their buffers stay referenced until the send completes.
    Receives are posted ahead (``expect_hidden``, ``expect_tokens``) and completed in the
    order they were posted (``recv_hidden``, ``recv_tokens``), which is the order the peer
    sends in. Tokens travel in their own process group: with NCCL, operations between one
    pair of ranks are ordered on one stream, and with two stages hidden states (0 → 1) and
    tokens (1 → 0) would otherwise queue behind each other. With a single stage the token
    ring is a local queue. Every rank must create its links at the same point (the token
    group is made collectively).

    >>> links = StageLinks(rank=0, world_size=1, device=torch.device("cpu"), timeout_s=60)
    >>> links.expect_tokens(2)
    >>> links.send_tokens(torch.tensor([5, 7]), keep_going=True)
    >>> links.recv_tokens()
    (tensor([5, 7]), True)
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self._pending: list[tuple[dist.Work, int, torch.Tensor]] = []
        self._posted_hidden: deque[_Posted] = deque()
        self._posted_tokens: deque[_Posted] = deque()
        self._local_tokens: deque[torch.Tensor] = deque()
        timeout = timedelta(seconds=timeout_s)
        self._token_group = dist.new_group([0, world_size - 1], timeout=timeout) if world_size > 1 else None

    @property
    def previous(self) -> int:
        return self.rank - 1

    @property
    def next(self) -> int:
        return self.rank + 1

    @property
    def last(self) -> int:
        return self.world_size - 1

    def send_hidden(self, hidden: torch.Tensor) -> None:
        """Send one micro-batch's hidden states [batch, tokens, hidden] to the next stage."""
        message = self._hidden_message(_HIDDEN, hidden.shape, hidden.dtype)
        _payload(message, hidden.shape, hidden.dtype).copy_(hidden)
        self._send(message, self.next)

    def send_stop(self, batch: int, width: int, dtype: torch.dtype) -> None:
        """Tell the next stage that the micro-batch of ``batch`` rows it expects next has finished.

        The notice has the size of the decode step it replaces, which the next stage has
        already posted a receive for.
        """
        message = self._hidden_message(_STOP, (batch, 1, width), dtype)
        message[_HEADER_BYTES:].zero_()
        self._send(message, self.next)

    def expect_hidden(self, batch: int, tokens: int, width: int, dtype: torch.dtype) -> None:
        """Post the receive of the previous stage's next hidden states [batch, tokens, width], or stop notice."""
        shape = (batch, tokens, width)
        message = self._new_message(shape, dtype)
        work = self._post(message, self.previous, "hidden states")
        self._posted_hidden.append(_Posted(work, message, shape, dtype))

    def recv_hidden(self) -> torch.Tensor | None:
        """The hidden states of the oldest posted receive, once they arrive, or None if that micro-batch finished."""
        posted = self._posted_hidden.popleft()
        self._wait(posted.work, self.previous, "receiving hidden states from")
        kind, *shape = posted.message[:_HEADER_BYTES].view(torch.int64).tolist()
        if kind not in (_HIDDEN, _STOP) or tuple(shape) != posted.shape:
            raise PipelineError(
                f"rank {self.rank} expected hidden states of shape {list(posted.shape)} from rank "
                f"{self.previous} but got header {[kind, *shape]}; the ranks disagree on the request, "
                "which means they run different devicemap versions or were given different inputs"
            )
        if kind == _STOP:
            return None
        return _payload(posted.message, posted.shape, posted.dtype)

    def send_tokens(self, tokens: torch.Tensor, keep_going: bool) -> None:
        """From the last stage to stage 0: a micro-batch's new tokens and whether it continues."""
        message = torch.cat([tokens.to(torch.int64), tokens.new_tensor([int(keep_going)], dtype=torch.int64)])
        if self.world_size == 1:
            self._local_tokens.append(message)
            return
        self._send(message, 0, self._token_group)

    def expect_tokens(self, batch: int) -> None:
        """At stage 0: post the receive of the last stage's next tokens for a micro-batch of ``batch`` rows."""
        if self.world_size == 1:
            return
        message = torch.empty(batch + 1, dtype=torch.int64, device=self.device)
        work = self._post(message, self.last, "sampled tokens", self._token_group)
        self._posted_tokens.append(_Posted(work, message, (batch,), torch.int64))

    def recv_tokens(self) -> tuple[torch.Tensor, bool]:
        """At stage 0: the oldest posted receive's tokens, once they arrive, and whether that micro-batch goes on."""
        if self.world_size == 1:
            message = self._local_tokens.popleft()
        else:
            posted = self._posted_tokens.popleft()
            self._wait(posted.work, self.last, "receiving sampled tokens from")
            message = posted.message
        return message[:-1], bool(message[-1].item())

    def flush(self) -> None:
        """Wait until every send of this rank has been delivered."""
        while self._pending:
            work, peer, _buffer = self._pending.pop(0)
            self._wait(work, peer, "sending to")

    def _hidden_message(self, kind: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A byte buffer for one hidden-state message, its header written, its payload left to fill."""
        message = self._new_message(shape, dtype)
        header = torch.tensor([kind, *shape], dtype=torch.int64)
        message[:_HEADER_BYTES].view(torch.int64).copy_(header)
        return message

    def _new_message(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(_HEADER_BYTES + math.prod(shape) * dtype.itemsize, dtype=torch.uint8, device=self.device)

    def _send(self, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup | None = None) -> None:
        self._pending = [entry for entry in self._pending if not entry[0].is_completed()]
        try:
            work = dist.isend(tensor, peer, group=group)
        except RuntimeError as error:
            raise self._lost(peer, "sending to", error) from None
        self._pending.append((work, peer, tensor))

    def _post(self, tensor: torch.Tensor, peer: int, what: str, group: dist.ProcessGroup | None = None) -> dist.Work:
        try:
            return dist.irecv(tensor, peer, group=group)
        except RuntimeError as error:
            raise self._lost(peer, f"receiving {what} from", error) from None

    def _wait(self, work: dist.Work, peer: int, doing: str) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise self._lost(peer, doing, error) from None

    def _lost(self, peer: int, doing: str, error: RuntimeError) -> PeerLostError:
        text = str(error)
        if "timed out" in text.lower():
            reason = f"no answer within the {self.timeout_s:g} s timeout"
        elif "closed" in text.lower() or "reset" in text.lower():
            reason = "its connection closed, so it has stopped or died"
        else:
            reason = text.splitlines()[0] if text else type(error).__name__
        return PeerLostError(f"rank {self.rank} stopped while {doing} rank {peer}: {reason}", peer)


def _payload(message: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The hidden states inside a message: a view of the bytes after the header, no copy."""
    return message[_HEADER_BYTES:].view(dtype).view(shape)
