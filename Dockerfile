# syntax=docker/dockerfile:1
# resnet-serve, CPU image: a cached Rust build stage and a slim Debian runtime.
#
#   docker build -t resnet-serve:0.1.0 .
#   docker build --build-arg FETCH_WEIGHTS=1 -t resnet-serve:0.1.0-weights .   # weights baked in
#
# The binary is built with `cargo build --release --locked` and default features: the release
# profile and lockfile CI tests with. deploy/README.md has the run commands and weights options.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src

# cmake and nasm build libjpeg-turbo from source (the JPEG decoder, see src/preprocess/jpeg/).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first, against a dummy crate: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src target/release/resnet-serve* target/release/libresnet_serve* \
           target/release/.fingerprint/resnet-serve-* \
           target/release/deps/resnet_serve-* target/release/deps/libresnet_serve-*

# The real sources (.dockerignore keeps target/, .git, weights and deploy files out).
COPY . .
RUN cargo build --release --locked \
 && install -D -m 0755 target/release/resnet-serve /out/resnet-serve

# Optional: fetch and convert the pretrained ResNet56 now (needs network at build time), so the
# image serves without downloading anything. Declared after the build so toggling it reuses the
# compiled binary.
ARG FETCH_WEIGHTS=0
RUN mkdir -p /out/weights \
 && if [ "$FETCH_WEIGHTS" = "1" ]; then \
      /out/resnet-serve fetch-weights --output /out/weights/resnet56.safetensors; \
    fi

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
LABEL org.opencontainers.image.title="resnet-serve" \
      org.opencontainers.image.description="HTTP inference service for CIFAR ResNets (ResNet56), CPU build" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# ca-certificates for the first-run weights download; curl for HEALTHCHECK (the binary has no
# self-check subcommand).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 resnet \
 && useradd --system --uid 10001 --gid resnet --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin resnet \
 && install -d -o 10001 -g 10001 /app /app/weights

COPY --from=build /out/resnet-serve /usr/local/bin/resnet-serve
# Empty unless built with FETCH_WEIGHTS=1. /app/weights/resnet56.safetensors is the default
# weights path (relative to WORKDIR), so a baked file is used with no configuration; without one,
# `serve` downloads it there on first start (writable by the service user) unless
# RESNET_OFFLINE=true.
COPY --from=build --chown=10001:10001 /out/weights/ /app/weights/

WORKDIR /app
ENV RESNET_HOST=0.0.0.0 \
    RESNET_PORT=8080 \
    RESNET_DEVICE=cpu \
    RESNET_LOG_FORMAT=json

USER 10001:10001
EXPOSE 8080
# Liveness only: readiness (/health/ready) is the orchestrator's business. The start period
# covers a first-run weights download.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null \"http://127.0.0.1:${RESNET_PORT}/health/live\" || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["resnet-serve"]
CMD ["serve"]
