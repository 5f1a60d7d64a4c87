"""What pipeline ranks send each other: tensors only, each preceded by a small int header.

Stage s sends stage s+1 the hidden states of one micro-batch (or a stop notice); the last
stage sends stage 0 the tokens it sampled and whether the micro-batch goes on. Nothing is
pickled on the wire: every message is a raw tensor whose shape the receiver knows or reads
from the int64 header sent just before it, so a rank never unpickles what a peer sent.
Every wait is bounded by the process group's timeout, and a peer that dies or stops
answering becomes a :class:`PeerLostError` naming it.
"""

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import PipelineError

_HIDDEN = 1
_STOP = 0
_HEADER_VALUES = 4  # kind, batch, tokens, hidden size


class PeerLostError(PipelineError):
    """This rank stopped because a peer died, closed its connection or stopped answering."""

    def __init__(self, message: str, peer: int):
        super().__init__(message)
        self.peer = peer


class StageLinks:
    """The links of one rank: from the previous stage, to the next, and the token ring.

    Sends are asynchronous, so a stage computes its next micro-batch while the last one
    is still on the wire; their buffers stay referenced until the send completes.
    Tokens travel in their own process group: with NCCL, operations between one pair of
    ranks are ordered on one stream, and with two stages hidden states (0 → 1) and tokens
    (1 → 0) would otherwise queue behind each other. With a single stage the token ring
    is a local queue. Every rank must create its links at the same point (the token group
    is made collectively).

    >>> links = StageLinks(rank=0, world_size=1, device=torch.device("cpu"), timeout_s=60)
    >>> links.send_tokens(torch.tensor([5, 7]), keep_going=True)
    >>> links.recv_tokens(2)
    (tensor([5, 7]), True)
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self._pending: list[tuple[dist.Work, int, torch.Tensor]] = []
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
        batch, tokens, width = hidden.shape
        self._send(self._header(_HIDDEN, batch, tokens, width), self.next)
        self._send(hidden.contiguous(), self.next)

    def send_stop(self) -> None:
        """Tell the next stage that the micro-batch it expects now has finished."""
        self._send(self._header(_STOP, 0, 0, 0), self.next)

    def recv_hidden(self, batch: int, tokens: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The next micro-batch's hidden states from the previous stage, or None if it finished."""
        header = torch.empty(_HEADER_VALUES, dtype=torch.int64, device=self.device)
        self._recv(header, self.previous, "hidden states")
        kind, *shape = header.tolist()
        if kind == _STOP:
            return None
        if kind != _HIDDEN or shape != [batch, tokens, width]:
            raise PipelineError(
                f"rank {self.rank} expected hidden states of shape {[batch, tokens, width]} from rank "
                f"{self.previous} but got header {[kind, *shape]}; the ranks disagree on the request, "
                "which means they run different devicemap versions or were given different inputs"
            )
        hidden = torch.empty((batch, tokens, width), dtype=dtype, device=self.device)
        self._recv(hidden, self.previous, "hidden states")
        return hidden

    def send_tokens(self, tokens: torch.Tensor, keep_going: bool) -> None:
        """From the last stage to stage 0: a micro-batch's new tokens and whether it continues."""
        message = torch.cat([tokens.to(torch.int64), tokens.new_tensor([int(keep_going)], dtype=torch.int64)])
        if self.world_size == 1:
            self._local_tokens.append(message)
            return
        self._send(message, 0, self._token_group)

    def recv_tokens(self, batch: int) -> tuple[torch.Tensor, bool]:
        """At stage 0: the tokens the last stage sampled for the next micro-batch, and whether it continues."""
        if self.world_size == 1:
            message = self._local_tokens.popleft()
        else:
            message = torch.empty(batch + 1, dtype=torch.int64, device=self.device)
            self._recv(message, self.last, "sampled tokens", self._token_group)
        return message[:batch], bool(message[batch].item())

    def flush(self) -> None:
        """Wait until every send of this rank has been delivered."""
        while self._pending:
            work, peer, _buffer = self._pending.pop(0)
            self._wait(work, peer, "sending to")

    def _header(self, kind: int, batch: int, tokens: int, width: int) -> torch.Tensor:
        return torch.tensor([kind, batch, tokens, width], dtype=torch.int64, device=self.device)

    def _send(self, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup | None = None) -> None:
        self._pending = [entry for entry in self._pending if not entry[0].is_completed()]
        try:
            work = dist.isend(tensor, peer, group=group)
        except RuntimeError as error:
            raise self._lost(peer, "sending to", error) from None
        self._pending.append((work, peer, tensor))

    def _recv(self, tensor: torch.Tensor, peer: int, what: str, group: dist.ProcessGroup | None = None) -> None:
        doing = f"receiving {what} from"
        try:
            work = dist.irecv(tensor, peer, group=group)
        except RuntimeError as error:
            raise self._lost(peer, doing, error) from None
        self._wait(work, peer, doing)

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
