"""Every CUDA kernel variant of residtap.ops.capture_block once, on small shapes, checked against
the reference: the workload scripts/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck). Small on purpose: the sanitizers slow kernels down by orders of magnitude.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_op.py
    python scripts/sanitize_op.py cpu     # the same workload on the CPU op (a dry run of the script)
"""

from __future__ import annotations

import sys

import torch

from residtap import ops, reference
from residtap._build import load_extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fast kernel at every K (64 .. 8192), generic kernel (16-bit width % 8 != 0, width % 4 != 0,
# wider than 8192), torch's norm path (width % 4 != 0)
WIDTHS = (64, 200, 512, 1024, 1600, 4096, 8192, 68, 66, 8200)


DEVICE = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")


def one(rows: int, d: int, dtype, cap_dtype, index_kind: str | None, affine: str = "wb",
        staged: bool = False) -> list[str]:
    g = torch.Generator().manual_seed(d + rows)
    out = (torch.randn(2, rows, d, generator=g) * 3 + 30).to(dtype).to(DEVICE)
    inp = (torch.randn(2, rows, d, generator=g) * 3).to(dtype).to(DEVICE)
    w = (torch.randn(d, generator=g) + 1).to(dtype).to(DEVICE) if "w" in affine else None
    b = torch.randn(d, generator=g).to(dtype).to(DEVICE) if "b" in affine else None
    index = None
    if index_kind == "1d":
        index = torch.tensor([rows - 1, 0, rows // 2], device=DEVICE)
    elif index_kind == "2d":
        index = torch.tensor([[rows - 1, 0], [1, rows // 2]], device=DEVICE)
    n_pos = rows if index is None else index.shape[-1]
    bad = []
    res = {}
    for name, fn in (("op", ops.capture_block), ("ref", reference.capture_block)):
        bufs = {n: torch.empty(2, n_pos, d, dtype=cap_dtype, device=DEVICE)
                for n in ("resid", "delta", "normed")}
        bufs.update({n: torch.empty(2, n_pos, device=DEVICE) for n in ("mean", "rstd", "maxabs")})
        # staged on two blocks: each loops over several row groups, refilling both stages
        with ops.staged_rows(staged and name == "op"), ops.grid_cap(2 if staged else 0):
            fn(out, inp, index, norm_weight=w, norm_bias=b, norm_kind="layer_norm", eps=1e-5, **bufs)
        res[name] = bufs
    for n in res["op"]:
        if not torch.equal(res["op"][n], res["ref"][n]):
            bad.append(f"{n} differs at rows={rows} d={d} {dtype}->{cap_dtype} index={index_kind} "
                       f"affine={affine or 'none'} staged={staged}")
    return bad


def main() -> int:
    info = load_extension()
    assert info.loaded and (info.with_cuda or DEVICE.type != "cuda"), info
    bad = []
    for dtype in DTYPES:
        for d in WIDTHS:
            for rows, index_kind in ((1, None), (37, None), (9, "1d"), (9, "2d")):
                bad += one(rows, d, dtype, dtype, index_kind)
        bad += one(5, 1024, dtype, torch.float32 if dtype != torch.float32 else torch.bfloat16, None)
        for affine in ("w", "b", ""):  # the norm's other branches: weight only, bias only, neither
            for d in (512, 200):  # the fast kernel; 200: the generic one for 16-bit types
                bad += one(9, d, dtype, dtype, None, affine)
        # the fast kernel's staged variant (shared-memory stages, asynchronous copies): every K,
        # with and without a gather
        for d in (64, 512, 1600, 4096, 8192):
            for rows, index_kind in ((37, None), (9, "2d")):
                bad += one(rows, d, dtype, dtype, index_kind, staged=True)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    print("\n".join(bad) or "sanitize_op: all variants ran and matched the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
