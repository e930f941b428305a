#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for its Python 3.12 (x86-64, manylinux), into .whl/
# (ignored by git; the device `run` call carries it: benchmarks/GPU.md).
#
# The machine's image already has what latkv and its GPU tests import (numpy, scipy, numba,
# numba-cuda, cupy-cuda13x, rich, regex, pytest, hypothesis, onnx, onnxruntime, pyyaml,
# requests, tqdm). Only gguf is missing: tests/test_llm_tokenizer.py imports it at the top,
# so without it `pytest -m gpu tests` stops at collection. faiss and onnxruntime-extensions
# are skipped by their tests where absent. onnxruntime-gpu cannot travel: its wheel is about
# 243 MiB (the device tool carries at most 64 MiB) and it needs CUDA 12 libraries that the
# CUDA 13 image does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "gguf>=0.10"
ls -l .whl
