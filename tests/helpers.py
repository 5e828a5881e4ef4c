"""Shared test helpers: tiny seeded GPT-2 models and exact comparisons."""

from __future__ import annotations

import filecmp
import functools
import json
import os
import types

import numpy as np
import pytest
import torch

from residtap.models import random_gpt2
from residtap.overlap import SideStreams

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def tiny_gpt2(n_layer=2, n_embd=64, n_head=2, dtype=torch.float32, lm_head=True, seed=0):
    return random_gpt2(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=97, n_positions=256,
                       dtype=dtype, lm_head=lm_head, seed=seed)


def hook_counts(model) -> int:
    """Forward hooks and pre-hooks registered on ``model`` and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def ids_for(model, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


def padded(ids, positions, left, right):
    """A padding mask for ``ids``: row ``left[0]`` padded on the left (its first ``left[1]``
    tokens), row ``right[0]`` on the right (from position ``right[1]``). Returns (positions, the
    model's kwargs): positions "mask" becomes that mask as bool, and "last" / "mask" pass the mask
    to the model."""
    mask = torch.ones_like(ids)
    mask[left[0], :left[1]] = 0
    mask[right[0], right[1]:] = 0
    kwargs = {"attention_mask": mask} if positions in ("last", "mask") else {}
    return (mask.bool() if positions == "mask" else positions), kwargs


def ids_file(tmp_path, n_tokens=1000, vocab=97, seed=0, shape=None):
    """A .npy of seeded token ids (``vocab`` 97: tiny_gpt2's) for extract; returns (path, array)."""
    arr = np.random.default_rng(seed).integers(0, vocab, size=n_tokens).astype(np.int32)
    if shape is not None:
        arr = arr.reshape(shape)
    path = tmp_path / f"ids{seed}.npy"
    np.save(path, arr)
    return str(path), arr


def shard_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("shard-"))


def assert_same_dirs(a, b):
    """Two complete extractions hold byte-identical shards and the same manifest records."""
    fa, fb = shard_files(a), shard_files(b)
    assert fa == fb and fa
    _, mismatch, errors = filecmp.cmpfiles(a, b, fa, shallow=False)
    assert not mismatch and not errors, f"shards differ: {mismatch or errors}"
    ma, mb = (json.load(open(os.path.join(d, "manifest.json"))) for d in (a, b))
    assert ma["shards"] == mb["shards"] and ma["complete"] and mb["complete"]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between float32 tensors of the same sign."""
    assert a.dtype == b.dtype == torch.float32
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def assert_l2_close(got: torch.Tensor, ref_f64: torch.Tensor, max_ulp: int = 2) -> None:
    """The contract's one tolerance: l2 within 2 ulp of float32 against a float64 computation."""
    ref = ref_f64.float()
    assert got.shape == ref.shape and got.dtype == torch.float32
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite)
    d = ulp_distance(got[finite], ref[finite])
    assert d.numel() == 0 or int(d.max()) <= max_ulp, f"l2 off by {int(d.max())} ulp"


def snapshot(cap, outputs):
    """A copy of what ``cap`` holds now, for comparing once a later forward (a reference run inside
    ``with``) has overwritten its buffers."""
    held = types.SimpleNamespace()
    for name in outputs:
        value = getattr(cap, name)
        setattr(held, name, type(value)(*(t.clone() for t in value)) if name == "stats" else value.clone())
    return held


def assert_same_outputs(cap, ref, outputs) -> None:
    """Every captured output equals the reference bit for bit (l2: within 2 ulp). Not while ``cap`` is
    entered: a reference run there (as an argument of this call) is a forward it captures, which
    would compare the reference's forward with itself; compare a ``snapshot`` taken before."""
    assert not getattr(cap, "_handles", None), "compare a snapshot(cap, ...) taken before the reference runs"
    for name in outputs:
        if name == "stats":
            for stat in ("mean", "rstd", "maxabs"):
                got, want = getattr(cap.stats, stat), getattr(ref.outputs["stats"], stat)
                assert got.dtype == want.dtype and torch.equal(got, want), f"stats.{stat} differs"
            assert_l2_close(cap.stats.l2, ref.outputs["stats"].l2.double())
        else:
            got, want = getattr(cap, name), ref.outputs[name]
            assert got.dtype == want.dtype, f"{name}: {got.dtype} vs {want.dtype}"
            assert got.shape == want.shape, f"{name}: {tuple(got.shape)} vs {tuple(want.shape)}"
            assert torch.equal(got, want), f"{name} differs: max |diff| " \
                f"{(got.float() - want.float()).abs().max().item()}"


def nan_buffers(out, index, cap_dtype, normed=True) -> dict:
    """NaN-filled output buffers for one op call on ``out`` ``[batch, seq, d]`` gathered at
    ``index``, on ``out``'s device: a row the op forgot to write cannot pass."""
    batch, d = out.shape[0], out.shape[2]
    n_pos = out.shape[1] if index is None else index.shape[-1]
    names = ("resid", "delta") + (("normed",) if normed else ())
    bufs = {n: torch.full((batch, n_pos, d), float("nan"), dtype=cap_dtype, device=out.device)
            for n in names}
    bufs.update({n: torch.full((batch, n_pos), float("nan"), device=out.device)
                 for n in ("mean", "rstd", "l2", "maxabs")})
    return bufs


def make_inputs(batch, seq, d, dtype, seed=0, centre=0.0, noncontig=False):
    """Seeded (out, inp, norm weight, norm bias) of one block for calling the op: [batch, seq, d]
    around ``centre``; ``noncontig`` gives the same shapes with strides that are not row-major."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, d, seq) if noncontig else (batch, seq, d)
    out = (torch.randn(shape, generator=g) * 3 + centre).to(dtype)
    inp = (torch.randn(shape, generator=g) * 3 + centre).to(dtype)
    if noncontig:  # same values layout-wise, strides that are not row-major
        out, inp = out.transpose(1, 2), inp.transpose(1, 2)
    w = (torch.randn(d, generator=g) * 0.5 + 1).to(dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(dtype)
    return out, inp, w, b


class DeferredStreams(SideStreams):
    """A CUDA side stream emulated on the CPU, for Capture(overlap=True): each capture is queued and
    runs only when the main stream waits for it (the latest moment the discipline allows)."""

    def __init__(self, window: int = 2):
        super().__init__(window)
        self.queue: list = []  # (token, capture) not yet run
        self.held: list[tuple] = []  # per launch, the tensors the capture was given (and held)
        self.launched = self.max_queued = 0

    def has_stream(self, device):
        return True

    def run(self, device, layer_id, reads, fn):
        # What the GPU's caching allocator would punish: a capture that reaches a tensor other than
        # its arguments, the ones held (a main-stream tensor may be reused before the capture runs).
        captured = [c.cell_contents for c in (fn.__closure__ or ())]
        assert not any(isinstance(t, torch.Tensor) for t in captured), \
            "a side-stream capture reads a tensor that is not among its held arguments"
        self.held.append(reads)
        super().run(device, layer_id, reads, fn)

    def _fork(self, device):
        return "main", None

    def _on_side(self, device, side, fn):
        self.launched += 1
        self.queue.append((self.launched, fn))
        self.max_queued = max(self.max_queued, len(self.queue))

    def _record_done(self, device, side):
        return self.launched

    def _wait(self, pending):
        while self.queue and self.queue[0][0] <= pending.done:
            self.queue.pop(0)[1]()


def batch_minor_outputs(model, blocks):
    """Forward hooks that give each block's output the same values with batch-minor strides
    ([batch, seq, d] with stride(0) == d): not contiguous, so a packed capture must copy it first.
    Returns the handles; register before a capture (hooks run in registration order)."""
    def relayout(_module, _args, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs = hs.transpose(0, 1).contiguous().transpose(0, 1)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    return [blk.register_forward_hook(relayout) for blk in blocks]


# NaNs with a sign and payload that arithmetic in float would not give back (bit patterns).
NAN_BITS = {torch.float32: (-1, 0x7FC00001, -0x3FFFFF, 0x7F800001),
            torch.bfloat16: (-1, 0x7FC1, -0x7F, 0x7F81),
            torch.float16: (-1, 0x7E01, -0x1FF, 0x7C01)}
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_bits(shape, dtype, seed):
    """Every class of value the dtype has (zeros, subnormals, ties, infinities, NaNs, the largest
    finite), from uniformly random bit patterns."""
    info = torch.iinfo(_INT[dtype])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(_INT[dtype]).view(dtype)


def assert_copies_keep_nan_bits(capture_block, device):
    """resid and the no-input delta are copies of ``out`` in the model dtype (Tensor.to(dtype) is
    the identity there), so every bit of a NaN survives, in every dtype and in the wide kernel
    paths (d 64) as in the scalar ones (d 7), at every position or gathered (the same positions
    for every row, or per row). Cast to float32, the NaN is kept as a NaN."""
    per_row = torch.tensor([[2, 0, 2], [1, 1, 0]], device=device)
    for dtype, patterns in NAN_BITS.items():
        for d in (7, 64):
            out = make_inputs(2, 3, d, dtype)[0].to(device)
            bits = out.view(_INT[dtype])
            for k, pattern in enumerate(patterns):
                bits.view(-1)[5 * k + 1] = pattern
            assert out.isnan().sum() == len(patterns)
            for index, want in ((None, bits), (per_row[0], bits[:, per_row[0]]),
                                (per_row, torch.stack([bits[b, per_row[b]] for b in range(2)]))):
                resid, delta = (torch.empty(want.shape, dtype=dtype, device=device) for _ in range(2))
                capture_block(out, None, index, resid=resid, delta=delta)
                for name, got in (("resid", resid), ("delta", delta)):
                    assert torch.equal(got.view(_INT[dtype]), want), (dtype, d, name, index)
            wide = torch.empty(out.shape, dtype=torch.float32, device=device)
            capture_block(out, None, None, resid=wide)
            assert torch.equal(wide.isnan(), out.isnan()), (dtype, d)
            assert torch.equal(wide[~out.isnan()], out.float()[~out.isnan()]), (dtype, d)


def _misaligned(y):
    """A contiguous copy of ``y`` that starts one element past an aligned address."""
    buf = torch.empty(y.numel() + 1, dtype=y.dtype, device=y.device)
    out = buf[1:].view(y.shape)
    out.copy_(y)
    return out


class _MisalignedBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return _misaligned(x + torch.tanh(self.lin(x)))


class MisalignedBlocks(torch.nn.Module):
    """A toy model whose blocks return contiguous outputs one element past an aligned address:
    torch's CUDA LayerNorm sends such a tensor to its other (non-vectorized) kernel. No HF model
    does this; the contract norms the block output as the model holds it, so every path must too."""

    def __init__(self, d=64, n_layer=2, vocab=50, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([_MisalignedBlock(d) for _ in range(n_layer)])
        self.norm = torch.nn.LayerNorm(d)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p is self.norm.weight else 0.0))

    def forward(self, ids):
        x = _misaligned(self.embed(ids))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def check_misaligned_block_outputs(device, dtype, positions):
    """capture == run_reference on MisalignedBlocks, and the last layer's normed is the model's own
    output bit for bit (what HF's hidden_states[-1] is)."""
    import residtap
    from residtap.reference import OUTPUTS, run_reference

    model = MisalignedBlocks().to(device=device, dtype=dtype)
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1)).to(device)
    seen = []
    handle = model.layers[-1].register_forward_hook(lambda m, a, o: seen.append(o.data_ptr() % 16))
    kw = dict(blocks="layers", final_norm="norm")
    try:
        with torch.no_grad(), residtap.capture(model, outputs=OUTPUTS, positions=positions, **kw) as cap:
            final = model(ids)
    finally:
        handle.remove()
    assert seen and seen[0] != 0
    ref = run_reference(model, ids, outputs=OUTPUTS, positions=positions, **kw)
    assert_same_outputs(cap, ref, OUTPUTS)
    from residtap.reference import take
    from residtap.selection import resolve_positions
    sel = resolve_positions(positions, ids.shape[1]).as_selection(final.device)
    assert torch.equal(cap.normed[-1], take(final, sel))


def _overlap_case(case: str, device) -> dict:
    """Op arguments where one output shares memory with an input or another output."""
    out, inp = torch.randn(2, 4, 8, device=device), torch.randn(2, 4, 8, device=device)
    stats, rows = torch.zeros(2, 4, device=device), torch.zeros(3, 4, 8, device=device)
    flat = torch.randn(2 * 4 * 16, device=device)
    reverse = torch.tensor([3, 2, 1, 0], device=device)
    return {
        "resid is out": dict(out=out, index=reverse, resid=out),
        "delta is inp": dict(out=out, inp=inp, index=reverse, delta=inp),
        "one stats buffer": dict(out=out, mean=stats, maxabs=stats),
        "partial": dict(out=out, resid=rows[:2], delta=rows[1:]),
        # out strided (torch's own test cannot tell): resid covers some of its elements
        "strided out": dict(out=flat.view(2, 4, 16)[:, :, :8], resid=flat[8:72].view(2, 4, 8)),
    }[case]


# (the refused output, the argument it shares memory with, the case's name)
OVERLAP_CASES = (("resid", "out", "resid is out"), ("delta", "inp", "delta is inp"),
                 ("maxabs", "mean", "one stats buffer"), ("delta", "resid", "partial"),
                 ("resid", "out", "strided out"))


def assert_overlap_refused(name: str, other: str, case: str, device) -> None:
    """The op refuses ``case`` naming ``name`` and ``other``, and leaves every tensor as it was."""
    from residtap import ops

    kwargs = _overlap_case(case, device)
    out, inp, index = kwargs.pop("out"), kwargs.pop("inp", None), kwargs.pop("index", None)
    before = [t.clone() for t in (out, inp, *kwargs.values()) if t is not None]
    with pytest.raises(RuntimeError, match=f"'{name}' expected memory of its own, got .* sharing "
                                           f"memory with '{other}'"):
        ops.capture_block(out, inp, index, **kwargs)
    after = [t for t in (out, inp, *kwargs.values()) if t is not None]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
