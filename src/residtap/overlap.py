"""Capture beside the forward: each layer's capture on a side stream, overlapping the next blocks.

On one stream the capture of layer ``i`` runs between block ``i`` and block ``i+1``, and its memory
traffic (read the block's output and input, write every requested output) adds to the forward's time.
On a side stream it can run while block ``i+1``'s GEMMs keep the tensor cores busy::

    main:  block i ─ fork_i ─ block i+1 ─ … ─ wait(done_{i-W}) ─ … ─ end of forward: wait(all)
    side:            └ wait(fork_i) ─ capture i ─ record done_i

What that takes, and how this module provides it without a host sync:

- The side stream starts layer ``i`` after the main stream has produced it (``fork_i``).
- The tensors the capture reads (the block's output and input, any copy of them made for it, a
  per-forward position index) were allocated on the main stream; the capture is given them as
  arguments and reads nothing else of the forward's. The caching allocator may give their memory to
  a new main-stream tensor as soon as Python drops them, so this module holds them until the main
  stream has waited for the capture that reads them (``done_i``). That happens ``window`` layers
  later, and for all of them at the end of the forward. This is the hold-and-wait discipline, not
  ``record_stream``: memory stays bounded and no allocator events are involved.
- Nobody may modify a held tensor in place before the capture has read it. HF's blocks do not, but
  a model (or another hook) could. Each held tensor's version counter is compared when it is
  released. A change means the capture may have read the new values: OverlapError, and the capture
  is marked failed. This works only for tensors that have version counters, so not under
  ``torch.inference_mode``, and only for writes that bump them (not through ``.data``, nor by a
  custom kernel torch does not know mutates its argument).
- The buffers are written on the side stream. Readers on the main stream are ordered after those
  writes by the end-of-forward join. The next forward's captures wait for everything the main stream
  had queued before them (``fork``), so they cannot overwrite buffers a reader is still using.

Everything here is stream and event operations, which CUDA graphs capture as dependencies. Off CUDA
a capture simply runs in place. The events are pooled per device, so a steady state creates none.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, NamedTuple

import torch

from . import ops
from .selection import is_int


class OverlapError(RuntimeError):
    """A tensor the side-stream capture reads was modified in place before it was read."""


class _Pending(NamedTuple):
    device: torch.device
    main: object  # the device's stream the forward runs on
    done: object  # event recorded on the side stream after the capture
    layer_id: int
    reads: tuple  # the tensors the capture reads, held until the main stream waits on `done`
    versions: tuple  # their version counters at launch (None: the tensor has none)


class SideStreams:
    """One side stream per CUDA device. ``run`` launches a capture there; ``join`` orders the main
    streams after every capture launched so far. ``window``: how many captures may be in flight
    before the main stream waits for the oldest one (which bounds how many tensors are held)."""

    def __init__(self, window: int = 2, grid_cap: int = 0):
        # Checked here, not at the first launch: that is inside a forward, with the launch queued.
        if not is_int(window) or window < 1:
            raise ValueError(f"window: expected an int >= 1, got {window!r}")
        if not is_int(grid_cap) or grid_cap < 0:
            raise ValueError(f"grid_cap: expected an int >= 0 (0: no cap), got {grid_cap!r}")
        self.window = int(window)
        # Experimental (bench_capture --overlap-grid-caps measures it): at most this many thread
        # blocks per side-stream launch of the compiled op (0: no cap), so that a capture takes a
        # few SMs beside the next block's kernels instead of the whole GPU. Same bytes either way.
        self.grid_cap = int(grid_cap)
        self._streams: dict[torch.device, object] = {}
        self._events: dict[torch.device, list] = {}  # free events per device
        self._pending: collections.deque[_Pending] = collections.deque()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def has_stream(self, device: torch.device) -> bool:
        """Whether captures on ``device`` go to a side stream (else ``run`` runs them in place)."""
        return device.type == "cuda"

    def run(self, device: torch.device, layer_id: int, reads: tuple, fn: Callable[..., None]) -> None:
        """Run ``fn(*reads)`` beside the forward on ``device``'s side stream, or in place on a
        device without streams. ``fn`` writes only capture-owned buffers and reads main-stream
        tensors only through its arguments: those are exactly the tensors held (so a tensor made on
        the main stream just for the capture, such as a reshape's copy, cannot be missed)."""
        if not self.has_stream(device):
            fn(*reads)
            return
        held = tuple(t for t in reads if t is not None)
        versions = tuple(tensor_version(t) for t in held)
        main, side = self._fork(device)
        try:
            self._on_side(device, side, functools.partial(fn, *reads))
        finally:
            # Also when fn raised after queuing work (the final norm's module, or a hook on it,
            # raising after the op's kernels): that work is waited for like the rest, its reads
            # held until then, or their memory could go to new tensors while it still runs.
            done = self._record_done(device, side)
            self._pending.append(_Pending(device, main, done, layer_id, held, versions))
        while len(self._pending) > self.window:
            self._retire(self._pending.popleft(), check=True)

    def join(self, check: bool = True) -> None:
        """Make each main stream wait for every capture launched on its device (no host sync).
        ``check``: raise OverlapError if a read tensor changed in place (after joining them all)."""
        error = None
        while self._pending:
            try:
                self._retire(self._pending.popleft(), check=check)
            except OverlapError as exc:
                error = error or exc
        if error is not None:
            raise error

    # ------------------------------------------------------------------ stream mechanics
    def _event(self, device: torch.device):
        free = self._events.setdefault(device, [])
        return free.pop() if free else torch.cuda.Event()

    # A launch is _fork, _on_side, _record_done; a test double overrides these and _wait to
    # emulate a stream on the CPU.
    def _fork(self, device: torch.device):
        """(``device``'s current stream, its side stream made to wait for what is queued there)."""
        main = torch.cuda.current_stream(device)
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        fork = self._event(device)
        fork.record(main)
        side.wait_event(fork)
        self._events[device].append(fork)  # reusable now: a later record does not move this wait
        return main, side

    def _on_side(self, device: torch.device, side, fn: Callable[[], None]) -> None:
        with torch.cuda.stream(side), (ops.grid_cap(self.grid_cap) if self.grid_cap
                                       else contextlib.nullcontext()):
            fn()

    def _record_done(self, device: torch.device, side):
        done = self._event(device)
        done.record(side)
        return done

    def _wait(self, pending: _Pending) -> None:
        pending.main.wait_event(pending.done)
        self._events[pending.device].append(pending.done)

    def _retire(self, pending: _Pending, check: bool) -> None:
        self._wait(pending)
        if not check:
            return
        if any(v is not None and tensor_version(t) != v
               for t, v in zip(pending.reads, pending.versions)):
            raise OverlapError(
                f"residtap: a hidden state of residual index {pending.layer_id} was modified in place "
                "while its capture on the side stream could still be reading it, so the captured "
                "values may be the modified ones. This model (or another hook) changes hidden states "
                "in place: capture it with overlap=False.")


def tensor_version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place change), or None where it has none."""
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (nor in-place updates outside)
        return None
