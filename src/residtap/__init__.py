"""residtap: exact, fast capture of the residual stream of HF transformer models.

    with residtap.capture(model, outputs=("resid", "delta", "normed", "stats")) as cap:
        model(input_ids)
    cap.resid   # [n_layers + 1, batch, seq, d_model], raw, before any final norm

See README.md for the exactness contract.
"""

from .arch import FAMILIES, Family, UnsupportedStreamError
from .capture import Capture, CaptureConfig, CaptureError, capture
from .extract import ExtractResult, extract
from .reference import Stats
from .store import Activations, ManifestMismatchError, ShardCorruptError, StoreError
from .store import open_activations as open  # noqa: A001  (residtap.open(DIR), by design)
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = ["Capture", "CaptureConfig", "CaptureError", "FAMILIES", "Family", "Stats", "VerifyReport",
           "capture", "verify", "__version__", "extract", "ExtractResult", "open", "Activations",
           "StoreError", "ManifestMismatchError", "ShardCorruptError", "UnsupportedStreamError"]
