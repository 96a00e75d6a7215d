#!/bin/sh
# tests/check-symbols.sh LIBRARY: fails when the static library defines an
# external C symbol without the sdx4_ prefix, so that a program linking
# libsdx4 cannot collide with the engine's internal functions. C++ names
# (the CUDA backend's, mangled as _Z...) carry their argument types and
# cannot collide with a C program's; names with __ are the toolchain's.
set -eu
symbols=$(nm -g --defined-only "$1" | awk 'NF == 3 {print $3}' | sort -u)
count=$(printf '%s\n' "$symbols" | grep -c .)
[ "$count" -gt 100 ] || { echo "only $count external symbols in $1: not the engine library?"; exit 1; }
bare=$(printf '%s\n' "$symbols" | grep -v -e '^sdx4_' -e '^_Z' -e '^__' || true)
if [ -n "$bare" ]; then
    echo "external symbols of $1 without the sdx4_ prefix:"
    printf '%s\n' "$bare"
    exit 1
fi
echo "$count external symbols, all sdx4_ (or C++)"
