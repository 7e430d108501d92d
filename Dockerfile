# syntax=docker/dockerfile:1
# resnet-serve, CPU image: a Rust build stage and a slim Debian runtime holding one stripped
# binary, with the pretrained ResNet56 compiled in (no weights file, no download, no curl).
#
#   docker build -t resnet-serve:0.1.0 .
#   docker run --rm -p 8080:8080 resnet-serve:0.1.0
#   docker build --target debug-symbols --output type=local,dest=symbols .   # the debug info
#
# The build stage is the same in Dockerfile.cuda but for the base image and CARGO_FEATURES:
# `cargo build --release --locked`, the release profile and lockfile CI tests with.
# scripts/test-image.sh builds and runs this file as it is.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# cmake and nasm build libjpeg-turbo from source (the JPEG decoder, see src/preprocess/jpeg/).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# Cargo features on top of the defaults (Dockerfile.cuda: cuda,cudnn).
ARG CARGO_FEATURES=""
# The registry and target directories are cache mounts: a rebuild after a source edit compiles
# only the crate. The binary ships stripped; its debug info (line tables: crash backtraces with
# file and line) is split into resnet-serve.debug, linked by build id and debuglink, and kept in
# the debug-symbols stage.
RUN --mount=type=cache,id=resnet-serve-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=resnet-serve-target,target=/src/target \
    cargo build --release --locked --features "${CARGO_FEATURES}" \
 && mkdir -p /out \
 && objcopy --only-keep-debug target/release/resnet-serve /out/resnet-serve.debug \
 && objcopy --strip-all --add-gnu-debuglink=/out/resnet-serve.debug \
            target/release/resnet-serve /out/resnet-serve \
 && /out/resnet-serve --version

# Debug info for the shipped binary, e.g. for gdb: put the file under /usr/lib/debug/ with
# the binary's path (gdb finds it there by build id or debuglink).
FROM scratch AS debug-symbols
COPY --from=build /out/resnet-serve.debug /usr/lib/debug/usr/local/bin/resnet-serve.debug

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
LABEL org.opencontainers.image.title="resnet-serve" \
      org.opencontainers.image.description="HTTP inference service for CIFAR ResNets (ResNet56), CPU build" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0 AND BSD-2-Clause"

RUN groupadd --system --gid 10001 resnet \
 && useradd --system --uid 10001 --gid resnet --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin resnet \
 && install -d -o 10001 -g 10001 /app /app/weights

COPY --from=build /out/resnet-serve /usr/local/bin/resnet-serve
# The embedded model's licence (BSD-2-Clause) travels with the binary.
COPY weights/LICENSE-resnet56-4bfd9763.txt /usr/share/doc/resnet-serve/

WORKDIR /app
# Weights: the embedded pretrained ResNet56 unless /app/weights/resnet56.safetensors exists (a
# mounted file) or RESNET_WEIGHTS names one.
ENV RESNET_HOST=0.0.0.0 \
    RESNET_PORT=8080 \
    RESNET_GRPC_PORT=8081 \
    RESNET_DEVICE=cpu \
    RESNET_LOG_FORMAT=json

USER 10001:10001
EXPOSE 8080 8081
# Liveness only: readiness (/health/ready) is the orchestrator's business.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["resnet-serve", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["resnet-serve"]
CMD ["serve"]
