"""Run tests/test_cuda.py without a GPU, to catch mistakes in the tests before a GPU lease.

It copies the tests to a temporary directory, with the device set to the CPU, CUDA's synchronization
and sleep calls stubbed out, and overlap's side stream replaced by helpers.DeferredStreams. Each
capture then runs only when the main stream waits for it, so the stream discipline is still tested.
What cannot run on a CPU is deselected: CUDA graphs, the device-side assert, and the architecture
error. A pass here shows that the tests' own logic holds with the CPU op as the device. It says
nothing about the CUDA kernels.

    python scripts/dry_run_cuda_tests.py [extra pytest args, e.g. -k overlap]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

PRELUDE = '''
import sys as _sys
import torch as _torch
_torch.cuda.synchronize = lambda *a, **k: None
_torch.cuda.set_sync_debug_mode = lambda *a, **k: None
_torch.cuda._sleep = lambda *a, **k: None
from helpers import DeferredStreams as _Deferred
from residtap import overlap as _overlap
_overlap.SideStreams = _Deferred
_sys.modules["residtap.capture"].SideStreams = _Deferred  # residtap.capture is also a function
'''

REPLACEMENTS = [  # (text in test_cuda.py, its dry-run stand-in); each must be found exactly once
    ('pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")', ""),
    ('CUDA = torch.device("cuda")', 'CUDA = torch.device("cpu")'),
    ('assert extension.with_cuda, f"the extension was built without CUDA: '
     '{extension.cuda_skipped_because}"', "pass"),
    ("assert CUDA.type in {d.type for d in cap._side._streams} and cap._side.pending == 0",
     "assert cap._side.pending == 0"),
    ("import helpers\n", PRELUDE + "import helpers\n"),
]
DESELECT = "not graph and not device_side and not architecture"


def main() -> int:
    with open(os.path.join(TESTS, "test_cuda.py")) as f:
        text = f.read()
    for old, new in REPLACEMENTS:
        if text.count(old) != 1:
            print(f"dry_run_cuda_tests: test_cuda.py changed; update REPLACEMENTS for: {old[:70]!r}",
                  file=sys.stderr)
            return 2
        text = text.replace(old, new)
    with tempfile.TemporaryDirectory(prefix="residtap-dry-") as tmp:
        for name in ("helpers.py", "conftest.py"):
            shutil.copy(os.path.join(TESTS, name), tmp)
        with open(os.path.join(tmp, "test_cuda_dry.py"), "w") as f:
            f.write(text)
        args, select = list(sys.argv[1:]), DESELECT
        if "-k" in args:  # pytest keeps only the last -k: fold the caller's into ours
            i = args.index("-k")
            select = f"({DESELECT}) and ({args[i + 1]})"
            del args[i:i + 2]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_cuda_dry.py",
               "-k", select, *args]
        return subprocess.call(cmd, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
