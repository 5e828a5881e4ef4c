"""The fused CUDA op against the reference contract, bit for bit, on the GPU.

Every test here needs a CUDA device and skips (with the reason) where there is none; the CUDA
sources are still compiled on machines without one (see test_build_includes_cuda_sources in
test_errors.py and .ci/run). scripts/gpu_check.sh runs this file, the sanitizers and the
benchmarks on a GPU machine. scripts/dry_run_cuda_tests.py runs it on the CPU (the CPU op as the
device, overlap's side stream emulated) to catch mistakes in the tests themselves before a lease.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import helpers
from helpers import (DTYPES, assert_copies_keep_nan_bits, assert_l2_close, assert_same_outputs,
                     check_misaligned_block_outputs, ids_for, nan_buffers, padded, tiny_gpt2)
from residtap import backend, ops, reference
from residtap.reference import OUTPUTS, run_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# Widths: the fast kernel's every K (64 .. 8192), widths % 4 == 0 but % 8 != 0 (16-bit types take
# the generic kernel), widths % 4 != 0 (torch's fallback LayerNorm: normed/mean/rstd from torch),
# and wider than the fast kernel's limit.
WIDTHS = (64, 68, 100, 768, 770, 1000, 1024, 1600, 2052, 4096, 5120, 8192, 8196)
ROW_COUNTS = (1, 7, 4099)


@pytest.fixture(scope="module")
def cuda_ext(extension):
    assert extension.with_cuda, f"the extension was built without CUDA: {extension.cuda_skipped_because}"
    return extension


def cuda_gpt2(**kwargs):
    """A CUDA copy of the cached tiny CPU model (moving the cached one would break CPU tests)."""
    return copy.deepcopy(tiny_gpt2(**kwargs)).to(CUDA)


def make_inputs(rows, d, dtype, seed=0, centre=0.0, batch=1):
    """helpers.make_inputs with ``rows`` positions per batch row, on the GPU."""
    return tuple(t.to(CUDA) for t in helpers.make_inputs(batch, rows, d, dtype, seed=seed, centre=centre))


def make_index(kind, batch, seq, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "1d":
        return torch.randint(0, seq, (min(seq + 3, 9),), generator=g).to(CUDA)
    return torch.randint(0, seq, (batch, min(seq, 5)), generator=g).to(CUDA)


def run_both(out, inp, index, w, b, eps, cap_dtype, norm_kind="layer_norm"):
    """The compiled op and the reference op on the same arguments; NaN-filled buffers so that a
    row the op forgot to write cannot pass."""
    got, want = (nan_buffers(out, index, cap_dtype, normed=norm_kind != "none") for _ in range(2))
    for res, fn in ((got, ops.capture_block), (want, reference.capture_block)):
        fn(out, inp, index, norm_weight=w, norm_bias=b, norm_kind=norm_kind, eps=eps, **res)
    return got, want


def assert_equal_outputs(got, want, out, index):
    for name in got:
        if name == "l2":
            l2 = torch.linalg.vector_norm(out.double(), dim=-1)
            assert_l2_close(got["l2"], reference.take(l2, index))
        else:
            assert got[name].dtype == want[name].dtype
            assert torch.equal(got[name], want[name]), (
                f"{name} differs: max |diff| {(got[name].float() - want[name].float()).abs().max().item()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_cuda_op_matches_reference(cuda_ext, dtype, d, rows):
    for centre in (0.0, 30.0):
        out, inp, w, b = make_inputs(rows, d, dtype, seed=d + rows, centre=centre)
        got, want = run_both(out, inp, None, w, b, 1e-5, dtype)
        assert_equal_outputs(got, want, out, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (64, 68, 770, 1600, 4096))
@pytest.mark.parametrize("index_kind", ["1d", "2d"])
def test_cuda_op_gathers_positions(cuda_ext, dtype, d, index_kind):
    out, inp, w, b = make_inputs(11, d, dtype, seed=d, batch=3)
    index = make_index(index_kind, 3, 11)
    got, want = run_both(out, inp, index, w, b, 1e-5, dtype)
    assert_equal_outputs(got, want, out, index)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (64, 768, 1600, 4096, 1004, 8196))
@pytest.mark.parametrize("cap", (1, 3, 64))
def test_cuda_op_under_a_grid_cap_matches_reference(cuda_ext, dtype, d, cap):
    """A capped launch (overlap's side stream may cap it) loops its blocks over all the rows: the
    same outputs, for the fast kernel (several rows per block and one) and the generic one."""
    out, inp, w, b = make_inputs(4099, d, dtype, seed=d + cap, centre=30.0)
    index = make_index("2d", 1, 4099)
    for idx in (None, index):
        with ops.grid_cap(cap):
            got, want = run_both(out, inp, idx, w, b, 1e-5, dtype)
        assert_equal_outputs(got, want, out, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (64, 200, 768, 1000, 1600, 4096, 8192, 1004, 8196))
@pytest.mark.parametrize("cap", (0, 1))
def test_cuda_staged_op_matches_reference(cuda_ext, dtype, d, cap):
    """The fast kernel's staged variant (rows copied into shared memory one group ahead) gives the
    reference's bytes at every K, with and without a gather, with all outputs, without the block
    input (only out is staged), with the stats alone and with a cast; capped at one block, that
    block fills and refills both stages for every row group. Widths the fast kernel does not take
    (1004 in 16-bit types, 8196) run the generic kernel whatever the setting."""
    for rows in (1, 4099):
        out, inp, w, b = make_inputs(rows, d, dtype, seed=d + rows, centre=30.0, batch=2)
        index = make_index("2d", 2, rows)
        with ops.staged_rows(), ops.grid_cap(cap):
            for idx in (None, index):
                got, want = run_both(out, inp, idx, w, b, 1e-5, dtype)
                assert_equal_outputs(got, want, out, idx)
            got, want = run_both(out, None, None, w, b, 1e-5, dtype)
            assert_equal_outputs(got, want, out, None)
            got, want = run_both(out, inp, None, None, None, 1e-5, dtype, norm_kind="none")
            assert_equal_outputs(got, want, out, None)
            cast = torch.float32 if dtype != torch.float32 else torch.bfloat16
            got, want = run_both(out, inp, index, w, b, 1e-5, cast)
            assert_equal_outputs(got, want, out, index)


def test_cuda_staged_op_shared_memory_sizes_in_any_order(cuda_ext):
    """float32 rows take 96-128 KiB of stages, past the 48 KiB a kernel gets without opting in;
    the opt-in is made once per kernel and device, so a smaller size after a larger one (and the
    larger one again) must still launch and be right."""
    for d in (4096, 1600, 768, 4096, 1600, 8192):
        out, inp, w, b = make_inputs(513, d, torch.float32, seed=d, centre=30.0, batch=2)
        with ops.staged_rows():
            got, want = run_both(out, inp, None, w, b, 1e-5, torch.float32)
        assert_equal_outputs(got, want, out, None)


@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (68, 1024))
def test_cuda_op_casts(cuda_ext, model_dtype, cap_dtype, d):
    out, inp, w, b = make_inputs(33, d, model_dtype, seed=5, batch=2)
    index = make_index("2d", 2, 33)
    got, want = run_both(out, inp, index, w, b, 1e-5, cap_dtype)
    assert_equal_outputs(got, want, out, index)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["weight_only", "bias_only", "no_affine", "no_inp", "eps_1e-12",
                                     "torch_layer_norm", "stats_only"])
def test_cuda_op_variants(cuda_ext, dtype, variant):
    for d in (256, 1600):
        out, inp, w, b = make_inputs(9, d, dtype, seed=7, centre=30.0, batch=2)
        w = None if variant in ("bias_only", "no_affine") else w
        b = None if variant in ("weight_only", "no_affine") else b
        inp = None if variant == "no_inp" else inp
        eps = 1e-12 if variant == "eps_1e-12" else 1e-5
        kind = {"torch_layer_norm": "torch_layer_norm", "stats_only": "none"}.get(variant, "layer_norm")
        if kind == "none":
            w = b = None
        got, want = run_both(out, inp, None, w, b, eps, dtype, norm_kind=kind)
        assert_equal_outputs(got, want, out, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_misaligned_and_strided_inputs(cuda_ext, dtype):
    """Views that start one element in (torch's fallback LayerNorm runs for the reference: the op
    must notice and call torch) and batch-strided slices (the fast kernel's strides)."""
    d = 768
    base_out, base_inp, _, _ = make_inputs(1, 3 * 10 * d + 1, dtype, seed=3)
    _, _, w, b = make_inputs(1, d, dtype, seed=3)
    out = base_out.view(-1)[1:].view(3, 10, d)
    inp = base_inp.view(-1)[1:].view(3, 10, d)
    assert out.data_ptr() % (4 * out.element_size()) != 0  # really misaligned for torch's check
    got, want = run_both(out, inp, None, w, b, 1e-5, dtype)
    assert_equal_outputs(got, want, out, None)
    full_out, full_inp, w, b = make_inputs(16, d, dtype, seed=4, batch=3)
    out, inp = full_out[:, 2:9], full_inp[:, 2:9]  # batch stride 16 * d, not contiguous
    got, want = run_both(out, inp, None, w, b, 1e-5, dtype)
    assert_equal_outputs(got, want, out, None)


def test_cuda_op_many_rows(cuda_ext):
    """Hundreds of thousands of rows: the grid-stride loops and 64-bit offsets."""
    out, inp, w, b = make_inputs(300_001, 768, torch.bfloat16, seed=9)
    got, want = run_both(out, inp, None, w, b, 1e-5, torch.bfloat16)
    assert_equal_outputs(got, want, out, None)


def test_cuda_op_special_values(cuda_ext):
    out, inp, w, b = make_inputs(6, 512, torch.float32, seed=2)
    out[0, 1, 7] = float("nan")
    out[0, 2, 3] = float("inf")
    out[0, 3].zero_()
    out[0, 4] = 1e30
    got, want = run_both(out, inp, None, w, b, 1e-5, torch.float32)
    for name in ("resid", "delta", "normed", "mean", "rstd", "maxabs"):
        # NaN where the reference has NaN, bit-identical everywhere else
        assert torch.equal(got[name].isnan(), want[name].isnan()), name
        keep = ~want[name].isnan()
        assert torch.equal(got[name][keep], want[name][keep]), name
    assert want["normed"][0, 1].isnan().all() and not want["normed"][0, 0].isnan().any()


def test_cuda_copied_outputs_keep_every_bit_of_a_nan(cuda_ext):
    assert_copies_keep_nan_bits(ops.capture_block, CUDA)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", [None, slice(2, 7), [5, 0]], ids=str)
def test_cuda_capture_of_block_outputs_at_a_misaligned_address(cuda_ext, dtype, positions):
    """torch's LayerNorm runs its other kernel on such an output: normed and the stats must follow
    it (a span of positions is a non-contiguous view, which torch would copy to an aligned address;
    the capture gathers from the output itself), and so must run_reference's clone."""
    check_misaligned_block_outputs(CUDA, dtype, positions)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_opcheck(cuda_ext, dtype):
    out, inp, w, b = make_inputs(5, 64, dtype, batch=2)
    index = torch.tensor([4, 0, 2], device=CUDA)
    bufs = [torch.empty(2, 3, 64, dtype=dtype, device=CUDA) for _ in range(3)]
    bufs += [torch.empty(2, 3, device=CUDA) for _ in range(4)]
    torch.library.opcheck(torch.ops.residtap.capture_block.default,
                          (out, inp, index, w, b, "layer_norm", 1e-5, *bufs))


@pytest.mark.parametrize("name,other,case", list(helpers.OVERLAP_CASES))
def test_cuda_op_refuses_outputs_that_share_memory_with_an_argument(cuda_ext, name, other, case):
    """The same host-side check as on the CPU (test_op.py), before anything is launched."""
    helpers.assert_overlap_refused(name, other, case, CUDA)


def test_cuda_parity_guard_passes_on_this_torch(cuda_ext):
    """The guard's probe agrees with torch for the usual widths (else it warns and falls back)."""
    for dtype in DTYPES:
        for d in (768, 1600):
            w = torch.randn(d, device=CUDA).to(dtype)
            b = torch.randn(d, device=CUDA).to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert backend.norm_parity(CUDA, dtype, d, w, b, 1e-5) is True
                assert backend.norm_parity(CUDA, dtype, d, None, None, 1e-5) is True
                assert backend.norm_parity(CUDA, dtype, d, None, None, 1e-5, normed=True) is True



class _SyncIsAnError:
    """torch.cuda.set_sync_debug_mode("error") while residtap's own code runs inside the forward
    (its hooks: set-up on a new shape, the op, the norm), so that a sync in HF's code (its mask
    handling) cannot mask or fake a result."""

    def __init__(self, cap):
        self.cap = cap
        for name in ("_on_model_call", "_begin", "_write", "_on_model_exit"):
            setattr(cap, name, self._wrap(getattr(cap, name)))

    @staticmethod
    def _wrap(fn):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped


@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "overlap"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("positions", [None, [0, -1, 3], "last", "mask"])
def test_cuda_capture_matches_reference_without_host_sync(cuda_ext, dtype, positions, overlap):
    import residtap

    model = cuda_gpt2(n_layer=3, n_embd=128, n_head=4, dtype=dtype)
    ids = ids_for(model, 4, 16).to(CUDA)
    positions, kwargs = padded(ids, positions, left=(0, 5), right=(1, 12))
    ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, **kwargs)
    cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS, backend="compiled",
                           overlap=overlap)
    _SyncIsAnError(cap)
    torch.cuda.synchronize()
    for _ in range(2):  # the first forward sets up buffers and positions, the second reuses them
        with cap, torch.no_grad():
            model(ids, **kwargs)
    assert cap.backend == "compiled"
    assert_same_outputs(cap, ref, OUTPUTS)
    if overlap:
        assert CUDA.type in {d.type for d in cap._side._streams} and cap._side.pending == 0


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "staged"])
@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "overlap"])
def test_cuda_whole_forward_with_capture_never_syncs(cuda_ext, overlap, staged, monkeypatch):
    """The whole forward with the capture runs under sync-debug "error" mode, from the first call.
    HF's GPT-2 forward has one sync of its own, patched out here: without an attention mask,
    transformers looks for packed sequences in the position ids it made (`(...).all()` read on the
    host; seen on the H200 with transformers 5.17). Without a padding mask nothing else syncs."""
    import transformers.masking_utils as masking_utils

    import residtap

    if hasattr(masking_utils, "find_packed_sequence_indices"):
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    model = cuda_gpt2(n_layer=2, n_embd=128, n_head=4, dtype=torch.bfloat16)
    ids = ids_for(model, 2, 24).to(CUDA)
    ref = run_reference(model, ids, positions=[1, -1], outputs=OUTPUTS, use_cache=False)
    cap = residtap.Capture(model, positions=[1, -1], outputs=OUTPUTS, backend="compiled",
                           overlap=overlap)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with cap, torch.no_grad(), ops.staged_rows(staged):
            model(ids, use_cache=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same_outputs(cap, ref, OUTPUTS)


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "staged"])
@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "overlap"])
def test_cuda_graph_capture_replays_exactly(cuda_ext, overlap, staged):
    """The model's forward and the capture recorded together in a CUDA graph; replays on new inputs
    give what eager capture gives. With overlap the side stream forks from and joins the captured
    stream inside the graph. Staged: the graph records the staged kernel (set up, shared memory
    and grid chosen, while capturing), and the eager capture it is compared with does not."""
    import residtap

    model = cuda_gpt2(n_layer=3, n_embd=128, n_head=4, dtype=torch.float32)
    static_ids = ids_for(model, 2, 32, seed=0).to(CUDA)
    cap = residtap.Capture(model, outputs=OUTPUTS, backend="compiled", overlap=overlap)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), cap, torch.no_grad():
        for _ in range(2):  # warm-up outside the graph: allocations, caches, one-time set-up
            model(static_ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with cap, torch.no_grad(), ops.staged_rows(staged), torch.cuda.graph(graph):
        model(static_ids, use_cache=False)
    for seed in (1, 2):
        new_ids = ids_for(model, 2, 32, seed=seed).to(CUDA)
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        replayed = {n: getattr(cap, n).clone() for n in ("resid", "delta", "normed")}
        replayed_stats = [s.clone() for s in cap.stats]
        eager = residtap.Capture(model, outputs=OUTPUTS, backend="compiled")
        with eager, torch.no_grad():
            model(new_ids, use_cache=False)
        for n in ("resid", "delta", "normed"):
            assert torch.equal(replayed[n], getattr(eager, n)), n
        for got, want in zip(replayed_stats, eager.stats):
            assert torch.equal(got, want)


def lagging_side_streams(cycles: int = 2_000_000):
    """residtap.overlap.SideStreams whose side stream sleeps (about a millisecond) before each
    capture, so that the main stream runs far ahead: the capture is then right only if the tensors
    it reads are held, and the main stream waits for it, exactly where the discipline says."""
    from residtap.overlap import SideStreams

    class Lagging(SideStreams):
        def _on_side(self, device, side, fn):
            def slow():
                torch.cuda._sleep(cycles)
                fn()
            super()._on_side(device, side, slow)

    return Lagging()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_overlap_with_a_lagging_side_stream_is_still_exact(cuda_ext, dtype):
    import residtap

    model = cuda_gpt2(n_layer=6, n_embd=256, n_head=4, dtype=dtype)
    for seed, (batch, seq) in enumerate([(8, 200), (4, 256)]):  # the second reallocates the buffers
        ids = ids_for(model, batch, seq, seed=seed).to(CUDA)
        with torch.no_grad():
            plain = model(ids, use_cache=False).logits
        ref = run_reference(model, ids, outputs=OUTPUTS, use_cache=False)
        cap = residtap.Capture(model, outputs=OUTPUTS, backend="compiled", overlap=True)
        cap._side = lagging_side_streams()
        with cap, torch.no_grad():
            logits = model(ids, use_cache=False).logits
        assert torch.equal(logits, plain)  # the model's own computation is untouched
        assert_same_outputs(cap, ref, OUTPUTS)


@pytest.mark.parametrize("grid_cap", (1, 16))
def test_cuda_overlap_with_a_grid_cap_is_exact(cuda_ext, grid_cap):
    import residtap

    model = cuda_gpt2(n_layer=4, n_embd=256, n_head=4, dtype=torch.bfloat16)
    ids = ids_for(model, 8, 200).to(CUDA)
    ref = run_reference(model, ids, outputs=OUTPUTS, use_cache=False)
    cap = residtap.Capture(model, outputs=OUTPUTS, backend="compiled", overlap=True)
    cap._side.grid_cap = grid_cap
    with cap, torch.no_grad():
        model(ids, use_cache=False)
    assert_same_outputs(cap, ref, OUTPUTS)
    assert torch.ops.residtap._set_grid_cap(0) == 0  # put back after each side-stream launch


def test_cuda_overlap_holds_the_copy_a_packed_capture_makes_of_a_non_contiguous_output(cuda_ext):
    # positions=mask packs each layer into one row; batch-minor block outputs must be copied for
    # that on the main stream, and only the lagging side-stream capture reads the copy: exact only
    # if it is held, since the next blocks' allocations would otherwise reuse its memory.
    import residtap

    model = cuda_gpt2(n_layer=6, n_embd=256, n_head=4, dtype=torch.bfloat16)
    ids = ids_for(model, 8, 200).to(CUDA)
    positions, kwargs = padded(ids, "mask", left=(0, 30), right=(5, 150))
    handles = helpers.batch_minor_outputs(model, model.transformer.h)
    try:
        ref = run_reference(model, ids, positions=positions, outputs=OUTPUTS, use_cache=False, **kwargs)
        cap = residtap.Capture(model, positions=positions, outputs=OUTPUTS, backend="compiled",
                               overlap=True)
        cap._side = lagging_side_streams()
        with cap, torch.no_grad():
            model(ids, use_cache=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert_same_outputs(cap, ref, OUTPUTS)


def test_cuda_overlap_detects_a_hidden_state_changed_in_place(cuda_ext):
    import residtap
    from residtap.overlap import OverlapError

    model = cuda_gpt2(n_layer=4, n_embd=128, n_head=4, dtype=torch.float32)
    ids = ids_for(model, 2, 16).to(CUDA)

    def doubles_its_input(_module, args):  # returns None: the block's arguments stay as they are
        args[0].mul_(2)

    handle = model.transformer.h[1].register_forward_pre_hook(doubles_its_input)
    try:
        with pytest.raises(OverlapError, match="residual index 1"), torch.no_grad():
            with residtap.capture(model, outputs=OUTPUTS, backend="compiled", overlap=True):
                model(ids, use_cache=False)
    finally:
        handle.remove()


def test_cuda_capture_device_side_index_check_is_in_a_subprocess(cuda_ext, tmp_path):
    """An index outside [0, seq) trips a device-side assert (checking on the host would sync). It
    poisons the CUDA context, so it runs in a child process."""
    code = textwrap.dedent("""
        import torch
        from residtap import ops
        from residtap._build import load_extension
        assert load_extension().with_cuda
        out = torch.zeros(1, 4, 64, device="cuda")
        resid = torch.empty(1, 1, 64, device="cuda")
        ops.capture_block(out, None, torch.tensor([7], device="cuda"), resid=resid)
        torch.cuda.synchronize()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ})
    assert r.returncode != 0
    assert "assert" in (r.stderr + r.stdout).lower()


@pytest.mark.skipif(os.environ.get("RESIDTAP_TEST_ARCH_ERROR") != "1",
                    reason="builds a second extension (about a minute); gpu_check.sh sets "
                           "RESIDTAP_TEST_ARCH_ERROR=1")
def test_cuda_missing_architecture_is_a_clear_error(cuda_ext, tmp_path):
    major, minor = torch.cuda.get_device_capability()
    other = "8.0" if major != 8 else "9.0"
    code = textwrap.dedent("""
        import torch
        from residtap import ops
        out = torch.zeros(1, 4, 64, device="cuda")
        try:
            ops.capture_block(out, None, None, resid=torch.empty_like(out))
        except RuntimeError as e:
            print("ERROR:", e)
        else:
            print("NO ERROR")
    """)
    env = {**os.environ, "RESIDTAP_CUDA_ARCHS": other, "RESIDTAP_BUILD_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "import residtap._build as b; b.load_extension();" + code],
                       capture_output=True, text=True, timeout=600, env=env)
    assert "ERROR:" in r.stdout, r.stdout + r.stderr
    assert "have no code for" in r.stdout and f"RESIDTAP_CUDA_ARCHS={major}.{minor}" in r.stdout
