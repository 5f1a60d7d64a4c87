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

Every wait blocks this rank's thread for at most the pipeline's timeout, and a peer that
dies or stops answering becomes a :class:`PeerLostError` naming it. Under NCCL that takes
two things gloo does by itself. A plain ``wait()`` only makes the current CUDA stream
wait: the host would run on and block, with no bound, in its first copy back from the
GPU. So every wait passes the timeout, which makes NCCL block the host until the
operation is done, and raise if it times out or its communicator reports an error
(torch's ``WorkNCCL::wait`` with a timeout). And NCCL's watchdog ends the process on
such an error unless ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is 0 when the process group is
made: the links make their own groups under that setting (see ``_errors_raised_by_waits``).
"""

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import PipelineError

_HIDDEN = 1
_STOP = 0
_HEADER_VALUES = 4  # kind, batch, tokens, hidden size
_HEADER_BYTES = _HEADER_VALUES * 8
_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


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
    sends in. Every link has a process group of its own: each pair of neighbouring stages,
    and the token pair. NCCL may run all the point-to-point operations of one group on one
    stream, in the order they were issued (it does for a group made with a bound device):
    in a shared group, a middle stage's receive, posted a pass ahead, would hold back its
    send to the next stage, which that receive waits for around the ring; and with two
    stages, hidden states (0 → 1) and tokens (1 → 0) would queue behind each other. With a
    single stage the token ring is a local queue. Every rank must create its links at the
    same point: the groups are made collectively, and each link opens with one message.

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
        self._pair_groups: list[dist.ProcessGroup] = []  # group r links rank r to rank r + 1
        self._token_group: dist.ProcessGroup | None = None
        if world_size > 1:
            timeout = timedelta(seconds=timeout_s)
            with _errors_raised_by_waits():
                self._pair_groups = [dist.new_group([r, r + 1], timeout=timeout) for r in range(world_size - 1)]
                self._token_group = dist.new_group([0, world_size - 1], timeout=timeout)
            self._open_links()

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
        self._send(message, self.next, self._pair_groups[self.rank])

    def send_stop(self, batch: int, width: int, dtype: torch.dtype) -> None:
        """Tell the next stage that the micro-batch of ``batch`` rows it expects next has finished.

        The notice has the size of the decode step it replaces, which the next stage has
        already posted a receive for.
        """
        message = self._hidden_message(_STOP, (batch, 1, width), dtype)
        message[_HEADER_BYTES:].zero_()
        self._send(message, self.next, self._pair_groups[self.rank])

    def expect_hidden(self, batch: int, tokens: int, width: int, dtype: torch.dtype) -> None:
        """Post the receive of the previous stage's next hidden states [batch, tokens, width], or stop notice."""
        shape = (batch, tokens, width)
        message = self._new_message(shape, dtype)
        work = self._post(message, self.previous, "hidden states", self._pair_groups[self.previous])
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

    def _open_links(self) -> None:
        """Open each link with one message, one pair of ranks at a time, in an order every rank agrees on.

        NCCL makes the communicator of a pair of ranks, per process group, at the pair's
        first send or receive, in a handshake that blocks the host until both ranks join it.
        Left to the schedule, stage 0 would first wait for tokens from the last stage (token
        group) while stage 1 first waits for hidden states from stage 0 (their pair's group):
        each would sit in a handshake the other never joins. Here every rank opens the link from
        its previous stage, then to its next, then the token pair: rank r meets r - 1 before
        r + 1, and rank 0 has no one to meet before rank 1, so each handshake finds its peer.
        """
        for peer in (self.previous, self.next):
            if 0 <= peer < self.world_size:
                self._exchange(peer, self._pair_groups[min(self.rank, peer)])
        if self.rank in (0, self.last):
            self._exchange(self.last if self.rank == 0 else 0, self._token_group)

    def _exchange(self, peer: int, group: dist.ProcessGroup) -> None:
        """The lower rank of a pair sends the higher one a single value, and both wait for it."""
        message = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.rank < peer:
            work = self._start(dist.isend, message, peer, group, "opening the link to")
        else:
            work = self._start(dist.irecv, message, peer, group, "opening the link from")
        self._wait(work, peer, "opening the link with")

    def _send(self, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
        self._pending = [entry for entry in self._pending if not entry[0].is_completed()]
        work = self._start(dist.isend, tensor, peer, group, "sending to")
        self._pending.append((work, peer, tensor))

    def _post(self, tensor: torch.Tensor, peer: int, what: str, group: dist.ProcessGroup) -> dist.Work:
        return self._start(dist.irecv, tensor, peer, group, f"receiving {what} from")

    def _start(self, operation: Callable, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup, doing: str):
        """Start one send or receive; every message of this rank goes through here."""
        try:
            return operation(tensor, peer, group=group)
        except RuntimeError as error:
            raise peer_lost(self.rank, peer, doing, error, self.timeout_s) from None

    def _wait(self, work: dist.Work, peer: int, doing: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            raise peer_lost(self.rank, peer, doing, error, self.timeout_s) from None


def peer_lost(rank: int, peer: int, doing: str, error: RuntimeError, timeout_s: float) -> PeerLostError:
    """The error that ends rank ``rank`` when an operation with ``peer`` failed with ``error``.

    gloo says "Timed out waiting 3000ms", NCCL "ran for 3000 milliseconds before timing out".

    >>> str(peer_lost(1, 0, "receiving hidden states from", RuntimeError("Timed out waiting 3000ms"), 3))
    'rank 1 stopped while receiving hidden states from rank 0: no answer within the 3 s timeout'
    """
    text = str(error).lower()
    if any(words in text for words in ("timed out", "timing out", "timeout")):
        reason = f"no answer within the {timeout_s:g} s timeout"
    elif any(words in text for words in ("closed", "reset", "remote process")):
        reason = "its connection closed, so it has stopped or died"
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return PeerLostError(f"rank {rank} stopped while {doing} rank {peer}: {reason}", peer)


@contextmanager
def _errors_raised_by_waits() -> Iterator[None]:
    """NCCL groups made inside leave a failed operation to the wait that asks for it.

    ProcessGroupNCCL reads ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` when it is made. Its
    default (3) has the watchdog thread end the process on a timed-out or failed
    operation, with an abort that names no peer; 0 leaves the watchdog out, and the
    host-blocking ``wait(timeout)`` then raises, after aborting the communicator itself.
    The setting is restored afterwards, so other groups of the process keep theirs.
    gloo does not read it.
    """
    previous = os.environ.get(_NCCL_ERROR_HANDLING)
    os.environ[_NCCL_ERROR_HANDLING] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_NCCL_ERROR_HANDLING]
        else:
            os.environ[_NCCL_ERROR_HANDLING] = previous


def _payload(message: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The hidden states inside a message: a view of the bytes after the header, no copy."""
    return message[_HEADER_BYTES:].view(dtype).view(shape)
