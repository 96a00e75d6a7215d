# sdx4 serve in a container, CPU or CUDA, from one multi-stage file.
# CPU (Debian 12):
#   docker build -t sdx4 .
# CUDA 12 + cuDNN (Ubuntu 24.04 bases; docker-compose.yml builds this one):
#   docker build -t sdx4:cuda --build-arg SDX4_CUDA=ON \
#       --build-arg BUILD_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#       --build-arg RUN_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
# Run:
#   docker run -p 8000:8000 -v $PWD/models/x4-upscaler:/models/x4-upscaler:ro sdx4
#
# podman build takes the same arguments; scripts/container-check.sh builds
# the CPU image with it and checks that the image serves. The variant is
# chosen by naming the base images, not by a stage named after an argument
# (`FROM build-${VARIANT}`), which BuildKit resolves but buildah 1.28
# (Debian 12's podman 4.3) does not.
#
# Weights are not part of the image: mount a diffusers folder at
# /models/x4-upscaler (or set SDX4_MODEL). Without one the container serves
# the demo model generated at build time (random weights: its output is
# noise, and the server says so in its log, health and model-info).
# Every setting of `sdx4 serve --help` can be given as SDX4_* variables.

# The CUDA bases are Ubuntu 24.04, not 22.04: 22.04's jansson (2.13) has no
# json_object_getn (the tokenizer's) and its libcurl (7.81) no
# CURLOPT_PROTOCOLS_STR. The build packages have the same names on Debian
# 12 and Ubuntu 24.04; the libraries that run differ (24.04's 64-bit time_t
# names end in t64), hence the two lists of the run stage. SDX4_CUDA=AUTO
# builds the CUDA backend when the build image has nvcc; ON makes a missing
# nvcc an error.
# oneDNN (the CPU's bfloat16 path, SDX4_CPU_DTYPE=bf16 on CPUs with AMX or
# AVX512-BF16) is Debian 12's libdnnl-dev 2.6 (libdnnl2 to run), in the CPU
# image only: the engine uses oneDNN 2's C API, and the CUDA image computes
# on the GPU (its CPU backend stays float32 there: SDX4_CPU_DTYPE=bf16 is
# refused by name).
ARG BUILD_IMAGE=debian:bookworm
ARG RUN_IMAGE=debian:bookworm-slim

# ---- build ------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
ARG SDX4_CUDA=AUTO
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config libjansson-dev libutf8proc-dev libopenblas-openmp-dev \
        libvips-dev libmicrohttpd-dev nettle-dev libcurl4-openssl-dev libgnutls28-dev \
        libsqlite3-dev libpq-dev libhiredis-dev zlib1g-dev \
    && . /etc/os-release && if [ "$VERSION_CODENAME" = bookworm ]; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libdnnl-dev; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt openapi.json ./
COPY include include
COPY src src
COPY assets assets
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
          -DSDX4_CUDA="$SDX4_CUDA" \
    && cmake --build build -j"$(nproc)" --target sdx4 \
    && build/sdx4 make-model --config assets/demo-model /opt/sdx4/demo --dtype fp32 --seed 0
# Swagger UI for /docs, from Debian's r-cran-swagger (its dist folder only,
# without R): served by the container itself, never from a CDN
RUN apt-get update && cd /tmp && apt-get download r-cran-swagger \
    && dpkg-deb -x r-cran-swagger_*.deb /tmp/swagger \
    && mkdir -p /opt/sdx4/swagger-ui \
    && cp /tmp/swagger/usr/lib/R/site-library/swagger/dist3/swagger-ui* /opt/sdx4/swagger-ui/ \
    && rm -rf /var/lib/apt/lists/* /tmp/swagger /tmp/*.deb

# ---- run --------------------------------------------------------------------
FROM ${RUN_IMAGE}
RUN . /etc/os-release && case "$VERSION_CODENAME" in \
        noble) libs="libutf8proc3 libvips42t64 libmicrohttpd12t64 libnettle8t64 libgnutls30t64 libcurl4t64 \
                     libhiredis1.1.0" ;; \
        *) libs="libutf8proc2 libvips42 libmicrohttpd12 libnettle8 libgnutls30 libcurl4 libhiredis0.14 \
                 libdnnl2" ;; \
    esac \
    && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        $libs libjansson4 libopenblas0-openmp libsqlite3-0 libpq5 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sdx4
COPY --from=build /src/build/sdx4 /usr/local/bin/sdx4
COPY --from=build /opt/sdx4 /opt/sdx4
ENV SDX4_HOST=0.0.0.0 \
    SDX4_PORT=8000 \
    SDX4_MODEL=/models/x4-upscaler \
    SDX4_DOCS_ASSETS=/opt/sdx4/swagger-ui
USER sdx4
EXPOSE 8000
# ready = model loaded and warmed up (503 before, and while draining); over
# HTTPS when SDX4_TLS_CERT is set (-k: it asks the server itself, by address)
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsSk "http${SDX4_TLS_CERT:+s}://127.0.0.1:${SDX4_PORT}/api/v1/health" >/dev/null || exit 1
# SIGTERM lets in-flight work finish (SDX4_SHUTDOWN_TIMEOUT, 30 s by default)
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "if [ -f \"$SDX4_MODEL/model_index.json\" ]; then exec sdx4 serve; else exec sdx4 serve --model /opt/sdx4/demo; fi"]
