#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels bench_capture's optional baselines (nnsight,
# TransformerLens) need on the GPU machine, which has no network and lacks them: they go to .whl/
# (ignored by git), and scripts/gpu_check.sh installs whatever it finds there into /tmp/site.
# Only what that machine's image (Python 3.12; torch, transformers, numpy, pandas, pyarrow, einops,
# jaxtyping, huggingface-hub, ... already there) is missing, pinned to versions checked together.
#
#   bash scripts/baseline_wheels.sh     # then run the device with carry: [".whl"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PKGS=(nnsight==0.8.1 transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      greenlet==3.5.6 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 zstandard==0.25.0 websocket-client==1.9.2 beartype==0.23.1
      typeguard==4.6.1 fancy-einsum==0.0.3)
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${PKGS[@]}"
du -sh .whl
