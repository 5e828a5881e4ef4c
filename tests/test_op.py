"""The capture op on CPU, called directly, against the reference contract, over awkward shapes."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import (DTYPES, OVERLAP_CASES, assert_copies_keep_nan_bits, assert_l2_close,
                     assert_overlap_refused, make_inputs, nan_buffers, random_bits)
from residtap import ops, reference

WIDTHS = (1, 3, 64, 66, 129, 768)
ROWS = ((1, 1), (2, 5), (3, 33))


def index_for(kind, batch, seq):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    if kind == "1d":
        return torch.randint(0, seq, (min(seq + 2, 5),), generator=g)
    return torch.randint(0, seq, (batch, 3), generator=g)


def run_op(out, inp, index, w, b, eps, cap_dtype, with_inp=True):
    bufs = nan_buffers(out, index, cap_dtype)
    ops.capture_block(out, inp if with_inp else None, index, norm_weight=w, norm_bias=b,
                      norm_kind="layer_norm", eps=eps, **bufs)
    return bufs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("batch,seq", ROWS)
@pytest.mark.parametrize("index_kind", [None, "1d", "2d"])
def test_op_matches_reference(extension, dtype, d, batch, seq, index_kind):
    out, inp, w, b = make_inputs(batch, seq, d, dtype, seed=d + seq)
    index = index_for(index_kind, batch, seq)
    eps = 1e-5
    got = run_op(out, inp, index, w, b, eps, dtype)
    want = reference.block_outputs(out, inp, sel=index, final_norm=reference.layer_norm_fn(w, b, eps),
                                   eps=eps, outputs=reference.OUTPUTS)
    for name in ("resid", "delta", "normed"):
        assert torch.equal(got[name], want[name]), name
    for name in ("mean", "rstd", "maxabs"):
        assert torch.equal(got[name], getattr(want["stats"], name)), name
    assert_l2_close(got["l2"], reference.take(torch.linalg.vector_norm(out.double(), dim=-1), index))


@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "noncontig", "centre30", "no_affine", "weight_only",
                                     "bias_only", "no_inp"])
def test_op_casts_layouts_and_variants(extension, model_dtype, cap_dtype, variant):
    out, inp, w, b = make_inputs(2, 9, 66, model_dtype, seed=3, centre=30.0 if variant == "centre30" else 0.0,
                                 noncontig=variant == "noncontig")
    with_inp = variant != "no_inp"
    if variant in ("no_affine", "bias_only"):
        w = None
    if variant in ("no_affine", "weight_only"):
        b = None
    got = run_op(out, inp, None, w, b, 1e-5, cap_dtype, with_inp=with_inp)
    norm = reference.layer_norm_fn(w, b, 1e-5)
    want = reference.block_outputs(out, inp if with_inp else None, dtype=cap_dtype, final_norm=norm,
                                   eps=1e-5, outputs=reference.OUTPUTS)
    for name in ("resid", "delta", "normed"):
        assert got[name].dtype == cap_dtype
        assert torch.equal(got[name], want[name]), name
    for name in ("mean", "rstd", "maxabs"):
        assert torch.equal(got[name], getattr(want["stats"], name)), name


def _batch_minor(x: torch.Tensor) -> torch.Tensor:
    """The same values with strides (d, batch * d, 1): each row's elements adjacent, rows not d apart."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("layout", ["out_batch_minor", "inp_batch_minor", "both_batch_minor",
                                    "inp_transposed"])
@pytest.mark.parametrize("index_kind", [None, "2d"])
def test_op_reads_out_and_inp_by_their_own_strides(extension, layout, index_kind):
    """The CPU op addresses rows through each tensor's own strides: an out whose rows are not d apart
    (a batch-minor hidden state), and an inp laid out unlike out, must give what contiguous ones do.
    ("noncontig" above gives out and inp the same strides, which hid a mix-up of the two.)"""
    out, inp, w, b = make_inputs(3, 5, 66, torch.bfloat16, seed=11)
    index = index_for(index_kind, 3, 5)
    o = _batch_minor(out) if layout in ("out_batch_minor", "both_batch_minor") else out
    i = {"inp_batch_minor": _batch_minor(inp), "both_batch_minor": _batch_minor(inp),
         "inp_transposed": inp.transpose(1, 2).contiguous().transpose(1, 2)}.get(layout, inp)
    assert torch.equal(o, out) and torch.equal(i, inp)
    assert o.stride() != out.stride() or i.stride() != inp.stride()
    got = run_op(o, i, index, w, b, 1e-5, torch.float32)
    want = reference.block_outputs(out, inp, sel=index, dtype=torch.float32, eps=1e-5,
                                   final_norm=reference.layer_norm_fn(w, b, 1e-5), outputs=reference.OUTPUTS)
    for name in ("resid", "delta", "normed"):
        assert torch.equal(got[name], want[name]), name
    for name in ("mean", "rstd", "maxabs"):
        assert torch.equal(got[name], getattr(want["stats"], name)), name


@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_inp", [True, False], ids=["inp", "embeddings"])
def test_op_each_output_requested_alone(extension, model_dtype, cap_dtype, with_inp):
    """Which conversions a row needs depends on what is asked: each output alone (a bfloat16 block's
    delta cast to float32 with no inp, the embeddings', used to read a float row never made: a crash)."""
    out, inp, w, b = make_inputs(2, 5, 66, model_dtype, seed=5)
    inp = inp if with_inp else None
    norm = dict(norm_weight=w, norm_bias=b, norm_kind="layer_norm", eps=1e-5)
    want = reference.block_outputs(out, inp, dtype=cap_dtype, final_norm=reference.layer_norm_fn(w, b, 1e-5),
                                   eps=1e-5, outputs=reference.OUTPUTS)
    for name in ("resid", "delta", "normed"):
        buf = torch.full((2, 5, 66), float("nan"), dtype=cap_dtype)
        ops.capture_block(out, inp, None, **norm, **{name: buf})
        assert torch.equal(buf, want[name]), name
    for name in ("mean", "rstd", "maxabs", "l2"):
        buf = torch.full((2, 5), float("nan"))
        ops.capture_block(out, inp, None, **norm, **{name: buf})
        if name == "l2":
            assert_l2_close(buf, torch.linalg.vector_norm(out.double(), dim=-1))
        else:
            assert torch.equal(buf, getattr(want["stats"], name)), name


def test_reference_l2_is_the_float64_norm_rounded(extension):
    """The contract's l2 is the float64 norm rounded to float32: the reference's own, not only the op's,
    where a float32 sum of squares would overflow (1e20 squared) or lose the small values."""
    out = torch.cat([torch.full((1, 1, 64), 1e20), torch.full((1, 1, 64), 1e-30),
                     random_bits((1, 6, 64), torch.float32, 3)], 1)
    want = torch.linalg.vector_norm(out.double(), dim=-1)
    assert_l2_close(reference.token_stats(out, 1e-5).l2, want)
    assert torch.isfinite(reference.token_stats(out, 1e-5).l2[0, 0])


def test_op_writes_only_requested_outputs(extension):
    out, inp, w, b = make_inputs(2, 4, 64, torch.float32)
    resid = torch.zeros(2, 4, 64)
    sentinel = torch.full((2, 4), 7.0)
    ops.capture_block(out, inp, None, resid=resid, l2=None, maxabs=None)
    assert torch.equal(resid, out)
    ops.capture_block(out, inp, None, maxabs=sentinel)
    assert torch.equal(sentinel, out.abs().amax(-1))


def test_op_maxabs_propagates_nan(extension):
    out = torch.randn(1, 3, 8)
    out[0, 1, 5] = float("nan")
    m = torch.empty(1, 3)
    ops.capture_block(out, None, None, maxabs=m)
    assert torch.equal(m.isnan(), out.abs().amax(-1).isnan())


def assert_equal_but_nan_bits(got, want, what):
    """Equal where ``want`` is a number, NaN where it is a NaN (whose payload torch's own vectorized
    and scalar casts do not agree on)."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
def test_cpu_row_loops_on_random_bit_patterns(extension, model_dtype):
    """The CPU op's own element loops (its float <-> bfloat16 conversion, delta's rounding, max |x|
    on the bits, l2 in lanes) against torch's casts and ops, on every kind of value, at widths whose
    tails the 8-lane loops handle apart (67, 8 * 33 + 5)."""
    for d in (67, 269):
        out, inp = random_bits((3, 41, d), model_dtype, d), random_bits((3, 41, d), model_dtype, d + 1)
        for cap_dtype in DTYPES:
            got = {n: torch.empty(3, 41, d, dtype=cap_dtype) for n in ("resid", "delta")}
            stats = {n: torch.empty(3, 41) for n in ("l2", "maxabs")}
            ops.capture_block(out, inp, None, **got, **stats)
            assert_equal_but_nan_bits(got["resid"], out.to(cap_dtype), f"resid as {cap_dtype}")
            assert_equal_but_nan_bits(got["delta"], (out - inp).to(cap_dtype), f"delta as {cap_dtype}")
            assert_equal_but_nan_bits(stats["maxabs"], out.float().abs().amax(-1), "maxabs")
            assert_l2_close(stats["l2"], torch.linalg.vector_norm(out.double(), dim=-1))


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` [batch, seq, d] in another memory layout (``expanded``: batch row 0 for every row)."""
    if layout == "padded":  # rows further apart than d
        return torch.nn.functional.pad(x, (0, 3))[..., :x.shape[-1]]
    if layout == "offset":  # a storage offset of one element
        buf = torch.empty(x.numel() + 1, dtype=x.dtype)
        return buf[1:].view(x.shape).copy_(x)
    if layout == "seq_major":
        return _batch_minor(x)
    return x[:1].expand(x.shape) if layout == "expanded" else x


def test_op_matches_reference_on_seeded_random_cases(extension):
    """A small seeded fuzz over what the cases above fix one at a time: layouts (padded rows, storage
    offsets, stride 0), empty and repeated selections, eps from 0 to inf, rows of one value and the
    dtype's largest, with inf and NaN (whose payload a cast or a subtraction need not keep)."""
    for seed in range(40):
        r = random.Random(seed)
        dtype, cap_dtype = r.choice(DTYPES), r.choice(DTYPES)
        batch, seq, d = r.randint(0, 3), r.randint(1, 9), r.choice([1, 5, 64, 67, 129])
        out, inp, w, b = make_inputs(batch, seq, d, dtype, seed=seed, centre=r.choice([0.0, 30.0]))
        if batch and r.random() < 0.5:
            out[r.randrange(batch), r.randrange(seq)] = r.choice([2.5, 0.0, torch.finfo(dtype).max])
            out.view(-1)[r.randrange(out.numel())] = r.choice([float("inf"), float("nan"), -0.0])
        out, inp = (_laid_out(x, r.choice(["contig", "padded", "offset", "seq_major", "expanded"]))
                    for x in (out, inp))
        index = r.choice([None, torch.randint(0, seq, (r.randint(0, 2 * seq),)),
                          torch.randint(0, seq, (batch, r.randint(0, 3)))])
        w, b = r.choice([w, None]), r.choice([b, None])
        eps = r.choice([1e-5, 0.0, 1.0, 1e30, float("inf")])
        got = nan_buffers(out, index, cap_dtype)
        ops.capture_block(out, inp, index, norm_weight=w, norm_bias=b, norm_kind="layer_norm", eps=eps,
                          **got)
        want = reference.block_outputs(out, inp, sel=index, dtype=cap_dtype, eps=eps,
                                       final_norm=reference.layer_norm_fn(w, b, eps),
                                       outputs=reference.OUTPUTS)
        for name in ("resid", "delta", "normed"):
            assert_equal_but_nan_bits(got[name], want[name], f"seed {seed}: {name}")
        for name in ("mean", "rstd", "maxabs"):
            assert_equal_but_nan_bits(got[name], getattr(want["stats"], name), f"seed {seed}: {name}")
        assert_l2_close(got["l2"], reference.take(torch.linalg.vector_norm(out.double(), dim=-1), index))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_kind", [None, "2d"])
def test_cpu_op_over_many_chunks_and_threads(extension, dtype, index_kind):
    """More selected rows than the CPU op's chunk (2**18 elements: 4096 rows at width 64), so the
    norm runs chunk by chunk, with one thread and with two: the reference's outputs either way."""
    batch, seq, d = 3, 1500, 64
    out, inp, w, b = make_inputs(batch, seq, d, dtype, seed=11)
    index = None if index_kind is None else torch.randint(
        0, seq, (batch, seq), generator=torch.Generator().manual_seed(2))
    want = reference.block_outputs(out, inp, sel=index, final_norm=reference.layer_norm_fn(w, b, 1e-5),
                                   eps=1e-5, outputs=reference.OUTPUTS)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            got = run_op(out, inp, index, w, b, 1e-5, dtype)
            for name in ("resid", "delta", "normed"):
                assert torch.equal(got[name], want[name]), (name, n_threads)
            for name in ("mean", "rstd", "maxabs"):
                assert torch.equal(got[name], getattr(want["stats"], name)), (name, n_threads)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_copied_outputs_keep_every_bit_of_a_nan(extension, impl):
    assert_copies_keep_nan_bits(ops.capture_block if impl == "op" else reference.capture_block, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(extension, dtype):
    out, inp, w, b = make_inputs(2, 5, 64, dtype)
    index = torch.tensor([4, 0, 2])
    bufs = [torch.empty(2, 3, 64, dtype=dtype) for _ in range(3)] + [torch.empty(2, 3) for _ in range(4)]
    torch.library.opcheck(torch.ops.residtap.capture_block.default,
                          (out, inp, index, w, b, "layer_norm", 1e-5, *bufs))
    bufs = [torch.empty(2, 5, 64, dtype=torch.float32), None, None, None, None, torch.empty(2, 5), None]
    torch.library.opcheck(torch.ops.residtap.capture_block.default,
                          (out, None, None, None, None, "none", 1e-5, *bufs))


def test_op_under_torch_compile(extension):
    out, inp, w, b = make_inputs(2, 5, 64, torch.float32)
    resid = torch.empty(2, 5, 64)

    @torch.compile(backend="eager", fullgraph=True)
    def f(o, i, r):
        ops.capture_block(o, i, None, resid=r)
        return o * 2

    f(out, inp, resid)
    assert torch.equal(resid, out)


BAD_ARGS = [
    (dict(out=torch.zeros(2, 3)), "out"),
    (dict(out=torch.zeros(2, 3, 0), resid=torch.zeros(2, 3, 0)), "out"),  # no norm or stat of 0 values
    (dict(out=torch.zeros(2, 3, 4, dtype=torch.int32)), "out"),
    (dict(inp=torch.zeros(2, 3, 5)), "inp"),
    (dict(index=torch.tensor([0.0])), "index"),
    (dict(index=torch.zeros(3, 1, dtype=torch.long)), "index"),
    (dict(index=torch.tensor([3]), resid=torch.zeros(2, 1, 4)), "index"),  # out of range for seq 3
    (dict(resid=torch.zeros(2, 3, 5)), "resid"),
    (dict(resid=torch.zeros(2, 3, 4, dtype=torch.float64)), "resid"),
    (dict(delta=torch.zeros(2, 4, 3).transpose(1, 2)), "delta"),
    (dict(mean=torch.zeros(2, 3, dtype=torch.float16)), "mean"),
    (dict(l2=torch.zeros(2, 4)), "l2"),
    (dict(norm_weight=torch.zeros(5)), "norm_weight"),
    (dict(norm_bias=torch.zeros(4, dtype=torch.float16)), "norm_bias"),
    (dict(norm_kind="rms"), "norm_kind"),
    (dict(norm_kind="none", normed=torch.zeros(2, 3, 4)), "normed"),
    (dict(index=torch.tensor([0], device="meta")), "index"),  # torch sends these to the fake impl
    (dict(mean=torch.zeros(2, 3, device="meta")), "mean"),
]
# What the reference checks too: all but the index values, the op's layout rule (contiguous buffers) and
# its dtypes (the reference takes float64, for the models the op lacks)
REFERENCE_CHECKS = [(k, a) for k, a in BAD_ARGS
                    if not (a == "index" and "resid" in k or a == "delta"
                            or a == "resid" and k["resid"].dtype == torch.float64)]


@pytest.mark.parametrize("impl,kwargs,argname", [("op", *c) for c in BAD_ARGS]
                         + [("reference", *c) for c in REFERENCE_CHECKS])
def test_op_rejects_bad_arguments_naming_them(extension, kwargs, argname, impl):
    """The op, and the reference that stands in for it, refuse the same arguments by name, before
    writing anything (the reference: all but what reads the device, the index values, and the
    op's layout rules)."""
    args = dict(out=torch.zeros(2, 3, 4), inp=None, index=None, norm_kind="layer_norm",
                resid=torch.zeros(2, 3, 4))
    args.update(kwargs)
    out = args.pop("out")
    fn = ops.capture_block if impl == "op" else reference.capture_block
    sentinel = args["resid"] if argname != "resid" else None
    if sentinel is not None:
        sentinel.fill_(7.0)
    with pytest.raises(RuntimeError, match=f"'{argname}' expected"):
        fn(out, args.pop("inp"), args.pop("index"), **args)
    assert sentinel is None or sentinel.eq(7.0).all()  # nothing written before the refusal


@pytest.mark.parametrize("eps", ["1e-5", None, "abc"])
def test_op_refuses_an_eps_that_is_not_a_number(extension, eps):
    """eps reaches the schema as given (its float takes ints and numpy floats too): a string is
    refused, not read as the number it spells, and each error names eps."""
    resid = torch.full((2, 3, 4), float("nan"))
    with pytest.raises(RuntimeError, match="Expected a value of type 'float' for argument 'eps' but "
                                           "instead found type"):
        ops.capture_block(torch.zeros(2, 3, 4), resid=resid, eps=eps)
    assert resid.isnan().all()


def test_cpu_op_checks_every_index_value_before_writing(extension):
    """A bad index value anywhere, the last of thousands included, raises before any output is
    written (the rows before it would otherwise already be in the buffers)."""
    out, inp, w, b = make_inputs(2, 3000, 64, torch.float32)
    for index in (torch.cat([torch.arange(2999), torch.tensor([3000])]),
                  torch.arange(3000).repeat(2, 1).index_put_((torch.tensor(1), torch.tensor(2999)),
                                                             torch.tensor(-1))):
        bufs = nan_buffers(out, index, torch.float32)
        before = {k: v.clone() for k, v in bufs.items()}
        with pytest.raises(RuntimeError, match=r"'index' expected values in \[0, 3000\), got (3000|-1)"):
            ops.capture_block(out, inp, index, norm_weight=w, norm_bias=b, norm_kind="layer_norm",
                              **bufs)
        for k in bufs:
            assert torch.equal(bufs[k].view(torch.int32), before[k].view(torch.int32)), k


@pytest.mark.parametrize("name,other,case", list(OVERLAP_CASES))
def test_op_refuses_outputs_that_share_memory_with_an_argument(extension, name, other, case):
    """An output sharing memory with an input or another output would be read while it is
    written, or written twice: refused up front, naming both (torch's out= ops refuse the same)."""
    assert_overlap_refused(name, other, case, "cpu")


def test_op_takes_outputs_cut_side_by_side_from_one_buffer(extension):
    """Outputs that share a buffer without overlapping are not mistaken for aliases."""
    out, inp, w, b = make_inputs(2, 4, 8, torch.float32)
    rows = torch.full((3, 2, 4, 8), float("nan"))  # resid, delta, normed side by side
    stats = torch.full((4, 2, 4), float("nan"))
    ops.capture_block(out, inp, None, norm_weight=w, norm_bias=b, norm_kind="layer_norm", resid=rows[0],
                      delta=rows[1], normed=rows[2], mean=stats[0], rstd=stats[1], l2=stats[2],
                      maxabs=stats[3])
    want = reference.block_outputs(out, inp, final_norm=reference.layer_norm_fn(w, b, 1e-5), eps=1e-5,
                                   outputs=reference.OUTPUTS)
    for k, name in enumerate(("resid", "delta", "normed")):
        assert torch.equal(rows[k], want[name]), name
    for k, name in ((0, "mean"), (1, "rstd"), (3, "maxabs")):
        assert torch.equal(stats[k], getattr(want["stats"], name)), name


def assert_cpu_op_unchanged_under(setting) -> None:
    """The CPU op's outputs with a CUDA launch setting in force equal the reference's."""
    out, inp, w, b = make_inputs(2, 5, 64, torch.float32)
    with setting:
        got = run_op(out, inp, None, w, b, 1e-5, torch.float32)
    want = nan_buffers(out, None, torch.float32)
    reference.capture_block(out, inp, None, norm_weight=w, norm_bias=b, norm_kind="layer_norm", eps=1e-5,
                            **want)
    for name in got:
        if name != "l2":
            assert torch.equal(got[name], want[name]), name


def test_staged_rows_is_per_thread_restored_and_validated(extension):
    """ops.staged_rows turns the fast CUDA kernel's staged variant on for this thread's launches
    (its CUDA outputs are checked in test_cuda.py) and puts back the setting before, also when the
    block raises; the CPU op ignores it."""
    import threading

    set_staged = torch.ops.residtap._set_staged_rows
    assert set_staged(False) is False
    with ops.staged_rows():
        assert set_staged(True) is True  # on inside the block (set again to read it)
        seen = []
        t = threading.Thread(target=lambda: seen.append(set_staged(False)))
        t.start()
        t.join()
        assert seen == [False]  # another thread's launches are not staged
        with pytest.raises(KeyError):
            with ops.staged_rows(False):
                assert set_staged(False) is False
                raise KeyError("inside")
        assert set_staged(True) is True
    assert set_staged(False) is False
    for bad in (1, 0, None, "yes"):
        with pytest.raises(ValueError, match=rf"on: expected True or False, got {bad!r}"):
            with ops.staged_rows(bad):
                pass
    assert set_staged(False) is False
    assert_cpu_op_unchanged_under(ops.staged_rows())


def test_grid_cap_is_per_thread_restored_and_validated(extension):
    """ops.grid_cap sets this thread's cap on the CUDA launches (the CUDA outputs under caps are
    checked in test_cuda.py) and puts back the one before, also when the block raises."""
    import threading

    set_cap = torch.ops.residtap._set_grid_cap
    assert set_cap(0) == 0
    with ops.grid_cap(7):
        assert set_cap(7) == 7  # the cap inside the block (set again to read it)
        seen = []
        t = threading.Thread(target=lambda: seen.append(set_cap(0)))
        t.start()
        t.join()
        assert seen == [0]  # another thread's launches are not capped
        with pytest.raises(KeyError):
            with ops.grid_cap(3):
                raise KeyError("inside")
        assert set_cap(7) == 7
    assert set_cap(0) == 0
    with pytest.raises(RuntimeError, match=r"argument 'blocks' expected an int >= 0 \(0: no cap\), got -2"):
        set_cap(-2)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"blocks: expected an int >= 0 \(0: no cap\), got {bad!r}"):
            with ops.grid_cap(bad):
                pass
    assert set_cap(0) == 0
    assert_cpu_op_unchanged_under(ops.grid_cap(1))  # off CUDA the cap changes nothing


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_written_buffers_count_as_modified_in_place(extension, impl):
    """The op bumps the version counter of every buffer it writes, as torch's in-place ops (and the
    reference's copy_) do: autograd then refuses a backward through a tensor saved from a buffer
    that was written again, and an inference tensor written outside inference mode is refused."""
    fn = ops.capture_block if impl == "op" else reference.capture_block
    out, inp = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    resid, mean, unused = torch.empty(2, 5, 8), torch.empty(2, 5), torch.empty(2, 5, 8)
    versions = [t._version for t in (resid, mean, unused, out, inp)]
    fn(out, inp, None, norm_kind="none", resid=resid, mean=mean)
    assert resid._version > versions[0] and mean._version > versions[1]
    assert [t._version for t in (unused, out, inp)] == versions[2:]  # only what was written
    w = torch.randn(8, requires_grad=True)
    loss = (resid * w).sum()  # saves resid for w's gradient
    fn(out + 1, inp, None, norm_kind="none", resid=resid)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():
        frozen = torch.empty(2, 5, 8)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        fn(out, inp, None, norm_kind="none", resid=frozen)
    with torch.inference_mode():  # inside it, as anywhere in inference mode: no version to bump
        fn(out, inp, None, norm_kind="none", resid=frozen)
    assert torch.equal(frozen, out)


def test_the_ops_load_the_library_themselves_in_a_fresh_process(extension):
    """residtap.ops called first thing (its docstring's example) builds or loads the library rather
    than failing on torch.ops.residtap; a launch setting made before anything loaded it holds."""
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom residtap import ops\n"
            "o, r = torch.randn(2, 3, 4), torch.empty(2, 3, 4)\n"
            "ops.capture_block(o, resid=r)\nassert torch.equal(r, o)\n"
            "with ops.grid_cap(7):\n    assert torch.ops.residtap._set_grid_cap(7) == 7\n"
            "with ops.staged_rows(True):\n    assert torch.ops.residtap._set_staged_rows(True) is True\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
