#!/bin/sh
# tests/check-cuda-wraps.sh ENGINE TEST WRAPS: fails when the CUDA backend
# in the static library ENGINE calls an entry point of the CUDA runtime,
# cuBLAS(Lt) or cuDNN that test_faults_cuda cannot fail: each must be in
# WRAPS (the names CMakeLists.txt gives the linker as --wrap, comma-
# separated) and have its __wrap_ function in the TEST program. Left out
# on purpose, as they cannot fail: what names a status or gives a version,
# and the code nvcc generates to register kernels and to configure a
# launch (the launch itself, cudaLaunchKernel or __cudaLaunchKernel, is
# wrapped; __cudaGetKernel runs once per kernel and process).
set -eu
engine=$1 test=$2 wraps=,$3,
calls=$(nm -u "$engine" | awk '$1 == "U" {print $2}' | grep -E '^_*(cuda|cublas|cudnn)' | sort -u)
count=$(printf '%s\n' "$calls" | grep -c .)
[ "$count" -gt 40 ] || { echo "only $count calls to the CUDA libraries in $engine: not a CUDA build?"; exit 1; }
defined=$(nm --defined-only "$test" | awk '{print $NF}' | sed -n 's/^__wrap_//p')
missing='' wrapped=0 skipped=0
for f in $calls; do
    case $f in
    cudaGetErrorString | cublasGetStatusString | cudnnGetErrorString | cudnnGetVersion | cublasLtGetVersion | \
        __cudaRegister* | __cudaUnregisterFatBinary | __cudaPushCallConfiguration | \
        __cudaPopCallConfiguration | __cudaGetKernel)
        skipped=$((skipped + 1))
        continue
        ;;
    esac
    case $wraps in
    *,"$f",*) ;;
    *)
        missing="$missing
  $f: not in CMakeLists.txt's SDX4_CUDA_WRAPS"
        continue
        ;;
    esac
    if printf '%s\n' "$defined" | grep -qxF "$f"; then
        wrapped=$((wrapped + 1))
    else
        missing="$missing
  $f: no __wrap_$f in tests/test_faults_cuda.c"
    fi
done
if [ -n "$missing" ]; then
    echo "the CUDA backend calls what test_faults_cuda does not fail:$missing"
    exit 1
fi
echo "$count entry points of the CUDA libraries called: $wrapped wrapped, $skipped that cannot fail left out"
