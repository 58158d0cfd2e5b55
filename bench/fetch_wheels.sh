#!/usr/bin/env bash
# Wheels for the GPU machine, which reaches no package index: run here, carry `.wheels`.
#   bash bench/fetch_wheels.sh          # trl + datasets (e2e baseline), math-verify, liger-kernel,
#                                       # peft (LoRA) with accelerate and psutil
#   bash bench/fetch_wheels.sh --ray    # and ray without its Java jars (2-GPU benchmarks)
# There: python3 -m pip install --no-deps --no-index .wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
download() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d .wheels "$@"
}
download trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0 \
    liger-kernel==0.8.5 peft==0.21.2 accelerate==1.16.0 psutil==7.2.2 \
    latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
if [[ "${1:-}" == "--ray" ]]; then
    # ray's needs that the GPU machine's image lacks (it has click, msgpack, protobuf, ...)
    download ray==2.60.0 jsonschema==4.25.1 jsonschema-specifications==2025.9.1 \
        referencing==0.36.2 rpds-py==0.27.1
    # The wheel (76 MiB) is over a call's 64 MiB; its jars (Java workers) are not needed.
    python3 - <<'EOF'
import glob, zipfile, os
path = glob.glob(".wheels/ray-*.whl")[0]
slim = path + ".slim"
with zipfile.ZipFile(path) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        if item.filename.startswith("ray/jars/"):
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not line.startswith(b"ray/jars/"))
        target.writestr(item, data)
os.replace(slim, path)
EOF
fi
du -sh .wheels
