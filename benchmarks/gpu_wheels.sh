#!/usr/bin/env bash
# Wheels for benchmarks/gpu.py on a GPU machine that reaches no package registry, downloaded here.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION] [FOLDER]     # defaults: 3.12 .whl
#
# What such a machine's image already holds (a CUDA build of jax, flax, optax, torch, tensorboard, numpy,
# absl-py, etils, cloudpickle, rich, tqdm, attrs, wrapt, six, typing-extensions) is not downloaded; what the
# scripts and the peer need beyond it is, pinned to the versions benchmarked on the CPU. Then, on the GPU
# machine, in the repository's root with FOLDER beside it, the command this prints at its end.
set -euo pipefail
python_version=${1:-3.12}
folder=${2:-.whl}
packages=(
    mujoco==3.17.0 glfw==2.11.0 pyopengl==3.1.10 websockets==17.4  # MuJoCo and what it imports
    gymnasium==1.4.0 farama-notifications==0.0.6 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
    sbx-rl==0.28.0 stable-baselines3==2.9.2  # the peer, and what it needs beyond the image
    tfp-nightly==0.26.0.dev20261027 dm-tree==0.1.10 gast==0.7.0 decorator==5.3.2
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d "$folder" "${packages[@]}"
echo "downloaded $(ls "$folder"/*.whl | wc -l) wheels to $folder ($(du -sh "$folder" | cut -f1)); on the GPU machine:"
echo "python3 -m pip install -q --no-index --no-deps --target /tmp/site $folder/*.whl && PYTHONPATH=/tmp/site python3 benchmarks/gpu.py"
