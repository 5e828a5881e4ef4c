import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `import helpers`


@pytest.fixture(scope="session")
def extension():
    """The compiled extension, built once per session; tests of the compiled path require it."""
    from residtap._build import load_extension

    info = load_extension()
    assert info.loaded, f"the compiled extension failed to build: {info.error}"
    return info
