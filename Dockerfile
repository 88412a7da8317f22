# sidecast as a sidecar container. Multi-stage: build with the Rust toolchain, run from a
# small Debian image as a non-root user. The test machine cannot pull these base images:
# tests/container/ runs the same runtime stage on FROM scratch around a static build
# (docs/operations.md, "The sidecar container").
#
#   docker build -t sidecast .
#   docker run -p 8080:8080 -e SIDECAST_TOKEN_HMAC_SECRET=change-me sidecast

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY examples examples
COPY tests tests
# A workspace member: cargo reads its manifest even to build sidecast alone.
COPY bench/generator bench/generator
RUN cargo build --release --locked --bin sidecast

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home sidecast
COPY --from=build /src/target/release/sidecast /usr/local/bin/sidecast
USER 10001
# Configuration by environment variables (docs/configuration.md). In a pod the app container
# reaches the control API on localhost; only the WebSocket port is published to clients.
ENV SIDECAST_WS_ADDR=0.0.0.0:8080 \
    SIDECAST_GRPC_ADDR=127.0.0.1:50051 \
    SIDECAST_ADMIN_ADDR=0.0.0.0:9090 \
    SIDECAST_LOG_FORMAT=json \
    SIDECAST_DEV_SECRET_FILE=/tmp/sidecast/dev-secret
EXPOSE 8080 50051 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["sidecast", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecast"]
