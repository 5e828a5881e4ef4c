"""Validation of what the user selects: layers, positions, dtype, outputs.

Each function raises ``ValueError`` naming the argument, what was expected and what was received.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
import re
from typing import Iterable, Sequence

import numpy as np
import torch

from .reference import NOT_GIVEN, OUTPUTS  # noqa: F401  (NOT_GIVEN: its home for callers)


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_int(x) -> bool:
    """An integer of any integral type (numpy's too), never bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def positive_int(value, name: str, *, none_ok: bool = False) -> int | None:
    """``value`` as an int >= 1 (numpy and other integral types too, never bool), or None where
    ``none_ok``; else a ValueError naming ``name``."""
    if value is None and none_ok:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if none_ok else ''}, got {value!r}")
    return int(value)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value, name: str) -> int:
    """An int (bytes) or a string like "512MiB", "1GiB", "2.5GB" → bytes."""
    if is_int(value):
        n = int(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)) \
            and m.group(2).lower() in _SIZE_UNITS:
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{name}: expected a byte count such as 1073741824, '512MiB' or '1GiB', "
                         f"got {value!r}")
    if n < 1:
        raise ValueError(f"{name}: expected a positive size, got {value!r}")
    return n


def _slice_text(s: slice) -> str:
    """``s`` as it is typed in brackets (``20:30``, ``::2``), for errors that name one."""
    text = ":".join("" if v is None else str(v) for v in (s.start, s.stop, s.step))
    return text[:-1] if s.step is None else text


def _integer_array(x) -> bool:
    """An integer (not bool) torch tensor or numpy array/scalar."""
    if isinstance(x, torch.Tensor):
        return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    return x.dtype.kind in "iu"


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """None, a torch dtype or its name → a supported torch dtype (or None for the model's)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{name}: expected None or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: expected None, torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {dtype!r}")
    return dtype


def resolve_device(device, name: str = "device") -> torch.device | None:
    """None, or a device this machine has that computes (a torch.device or its name): the CPU, a
    CUDA device, or another accelerator torch knows (mps, xpu, ...: the reference backend runs
    there); not meta."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type == "meta":
        raise ValueError(f"{name}: expected a device that computes, such as cpu, cuda or cuda:N, "
                         f"got {device!r}")
    if dev.type == "cuda":
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n_gpus:
            raise ValueError(f"{name}: {str(device)!r} is not available here ({n_gpus} CUDA devices "
                             "visible)")
    elif dev.type != "cpu":  # torch.backends.mps, torch.xpu, ...: whichever says is_available
        where = torch.backends if dev.type == "mps" else torch
        available = getattr(getattr(where, dev.type, None), "is_available", None)
        if available is None or not available():
            raise ValueError(f"{name}: {str(device)!r} is not available here")
    return dev


def resolve_outputs(outputs) -> tuple[str, ...]:
    if isinstance(outputs, str):
        outputs = (outputs,)
    if not isinstance(outputs, Iterable):
        raise ValueError(f"outputs: expected a name or a non-empty collection of names from {OUTPUTS}, "
                         f"got {outputs!r}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs: expected a non-empty subset of {OUTPUTS}, got {outputs!r}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs: expected distinct names, got {outputs!r}")
    return tuple(o for o in OUTPUTS if o in outputs)


def resolve_layers(layers, n_layers: int) -> list[int]:
    """Residual indices 0..n_layers (0 = embeddings, i = output of block i-1), ascending."""
    if layers is None:
        return list(range(n_layers + 1))
    if isinstance(layers, torch.Tensor) or type(layers).__module__ == "numpy":  # tensors, arrays
        if not _integer_array(layers) or layers.ndim > 1:
            raise ValueError(f"layers: expected None, an int or a sequence of ints (a 0-d or 1-d integer "
                             f"tensor or array will do), got a {layers.ndim}-d {layers.dtype} "
                             f"{type(layers).__name__}")
        layers = layers.tolist()
    if is_int(layers):
        layers = [layers]
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not all(map(is_int, layers)):
        raise ValueError(f"layers: expected None, an int or a sequence of ints, got {layers!r}")
    if not layers:
        raise ValueError("layers: expected at least one residual index, got an empty sequence")
    resolved = []
    for lid in layers:
        if not -(n_layers + 1) <= lid <= n_layers:
            raise ValueError(f"layers: expected residual indices in [{-(n_layers + 1)}, {n_layers}] "
                             f"(the model has {n_layers} blocks, so residual indices 0..{n_layers}), "
                             f"got {lid}")
        resolved.append(int(lid) % (n_layers + 1))  # a Python int, whatever integer type came in
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers: expected distinct residual indices, got {list(layers)} "
                         f"(= {resolved} after resolving negatives)")
    return sorted(resolved)


def _on_device(cache: dict, make_host, device: torch.device) -> torch.Tensor:
    """A host index tensor on ``device``, made once per device and kept in ``cache`` (with its
    pinned source, which must outlive the asynchronous copy): never a host sync."""
    key = str(device)
    if key not in cache:
        host = make_host()
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        cache[key] = (host, host.to(device, non_blocking=True))
    return cache[key][1]


@dataclasses.dataclass
class PositionPlan:
    """Positions resolved for one sequence length: ``span`` (a contiguous slice, taken as a view)
    or ``index`` (a list of ints, gathered by the op)."""

    seq_len: int
    span: slice | None = None
    index: list[int] | None = None
    _device_index: dict = dataclasses.field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        if self.index is not None:
            return len(self.index)
        return self.span.stop - self.span.start

    def as_selection(self, device: torch.device):
        """None, a slice, or an int64 index on ``device`` (cached; made without a host sync)."""
        if self.index is None:
            return None if self.n_pos == self.seq_len else self.span
        return _on_device(self._device_index, lambda: torch.tensor(self.index, dtype=torch.long), device)


LAST = "last"

_POSITIONS_EXPECTED = ("None, an int, a slice, a sequence or 1-D tensor of ints, 'last' (each row's "
                       "last real token) or a bool mask [batch, seq] of tokens to keep")


@dataclasses.dataclass(frozen=True, eq=False)
class KeepMask:
    """``positions=<bool tensor [batch, seq]>``: keep the True tokens, packed in row-major order.

    Built once at set-up: finding the kept tokens reads the mask (one host sync there, never
    inside a forward). ``kept`` is int64 ``[n_kept, 2]``, the (row, position) of each kept token,
    on the mask's device.
    """

    batch: int
    seq: int
    kept: torch.Tensor  # int64 [n_kept, 2], on the mask's device
    _flat_host: torch.Tensor  # int64 [1, n_kept]: row * seq + position, on the host
    _flat: dict = dataclasses.field(default_factory=dict)  # device -> _flat_host on that device

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "KeepMask":
        if mask.dim() != 2:
            raise ValueError(f"positions: a bool mask must be [batch, seq] (2-D), got shape "
                             f"{tuple(mask.shape)}")
        host = mask.detach().cpu()  # the set-up host sync the docstring mentions
        kept_host = host.nonzero()  # [n_kept, 2], row-major: the order boolean indexing gives
        if kept_host.shape[0] == 0:
            raise ValueError(f"positions: the bool mask of shape {tuple(mask.shape)} keeps no token "
                             "(every entry is False)")
        flat = (kept_host[:, 0] * host.shape[1] + kept_host[:, 1]).unsqueeze(0)
        return cls(host.shape[0], host.shape[1], kept_host.to(mask.device), flat)

    @property
    def n_kept(self) -> int:
        return self._flat_host.shape[1]

    def flat_index(self, device: torch.device) -> torch.Tensor:
        """int64 ``[1, n_kept]`` on ``device``, for outputs viewed as ``[1, batch * seq, d]``
        (cached per device; copied from pinned memory, so without a host sync)."""
        return _on_device(self._flat, lambda: self._flat_host, device)


# positions="last" on a forward without tokens (Capture and the reference refuse it alike)
NO_LAST_TOKEN = "positions='last': the input has no tokens (sequence length 0), so no row has a last token"


def last_token_index(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 ``[batch, 1]``: each row's last position whose ``attention_mask`` is nonzero, among the
    mask's last ``seq_len`` columns (those of the current tokens when a cache holds earlier ones);
    0 for a row with no real token. Any padding layout (left, right, both). Computed on the mask's
    device with tensor ops only: no host sync."""
    real = attention_mask[:, -seq_len:] != 0  # [batch, seq]
    pos = torch.arange(seq_len, device=real.device)
    return torch.where(real, pos, 0).amax(dim=1, keepdim=True)


def resolve_position_spec(positions):
    """Check ``positions`` once, at set-up, without a sequence length: returns the spec to keep.

    None | int | slice | tuple of ints (checked against each forward's length later), ``"last"``,
    or a :class:`KeepMask` for a bool tensor ``[batch, seq]``. Tensors of ints are read here, once.
    """
    if isinstance(positions, str):
        if positions != LAST:
            raise ValueError(f"positions: expected {_POSITIONS_EXPECTED}, got {positions!r}")
        return LAST
    if isinstance(positions, np.ndarray):  # as the tensor it converts to (as layers= takes arrays)
        positions = torch.from_numpy(positions)
    if isinstance(positions, torch.Tensor) and positions.dim() == 0 and positions.dtype != torch.bool \
            and not positions.dtype.is_floating_point and not positions.dtype.is_complex:
        positions = int(positions)  # a 0-d integer tensor: the int it holds
    if isinstance(positions, torch.Tensor):
        if positions.dtype == torch.bool:
            return KeepMask.from_mask(positions)
        if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype.is_complex:
            raise ValueError(f"positions: expected a 1-D integer tensor or a 2-D bool mask [batch, seq], "
                             f"got a {positions.dtype} tensor of shape {tuple(positions.shape)}")
        positions = tuple(positions.detach().cpu().tolist())
    if isinstance(positions, slice):
        try:
            positions.indices(2**62)  # int (or None) bounds and a non-zero step, checked now
        except (TypeError, ValueError) as e:
            raise ValueError(f"positions: expected a slice of ints with a non-zero step, got {positions!r} "
                             f"({e})") from None
        return slice(*(None if v is None else operator.index(v)
                       for v in (positions.start, positions.stop, positions.step)))
    if positions is None:
        return positions
    ints, one = _position_ints(positions)  # type checks now; range checks per sequence length
    return ints[0] if one else tuple(ints)


def _position_ints(positions) -> tuple[list[int], bool]:
    """An int, or a sequence or 1-D tensor of ints, as a list of Python ints (numpy's and torch's
    integers converted, so that no fixed-width type overflows later), and whether one int was given."""
    one = is_int(positions)  # an int is said back as given, not as the list it becomes
    if one:
        positions = [positions]
    elif isinstance(positions, torch.Tensor):
        if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"positions: expected a 1-D integer tensor, got a {positions.dtype} tensor "
                             f"of shape {tuple(positions.shape)}")
        positions = positions.tolist()
    if not isinstance(positions, Sequence) or isinstance(positions, str) \
            or not all(map(is_int, positions)):
        raise ValueError(f"positions: expected {_POSITIONS_EXPECTED}, got {positions!r}")
    if not positions:
        raise ValueError("positions: expected at least one position, got an empty sequence")
    return [int(p) for p in positions], one


def resolve_positions(positions, seq_len: int) -> PositionPlan:
    """None (all), an int, a slice, a sequence or 1-D tensor of ints; negatives as in Python."""
    if positions is None:
        return PositionPlan(seq_len, span=slice(0, seq_len))
    if isinstance(positions, slice):
        rng = range(*positions.indices(seq_len))
        if len(rng) == 0:
            raise ValueError(f"positions: the slice {_slice_text(positions)} selects no position of a "
                             f"sequence of length {seq_len}")
        if rng.step == 1:
            return PositionPlan(seq_len, span=slice(rng.start, rng.stop))
        return PositionPlan(seq_len, index=list(rng))
    positions, one = _position_ints(positions)
    bad = [p for p in positions if not -seq_len <= p < seq_len]
    if bad:
        raise ValueError(f"positions: expected positions in [{-seq_len}, {seq_len}) for the input's "
                         f"sequence length {seq_len}, got {positions[0] if one else bad}")
    index = [p % seq_len for p in positions]
    if index == list(range(index[0], index[0] + len(index))):
        return PositionPlan(seq_len, span=slice(index[0], index[0] + len(index)))
    return PositionPlan(seq_len, index=index)
