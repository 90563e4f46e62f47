# syntax=docker/dockerfile:1
# The latchkey image: one static-ish binary on distroless, running as a non-root user.
#
#   docker build -t ghcr.io/latchkey-dev/latchkey:0.1.0 .
#
# The Helm chart in charts/latchkey runs this image (image.repository, tag = the chart's appVersion).

# Build on the Debian release the runtime image is made from, so the binary links against the
# same glibc. Rust 1.95 is the crate's rust-version.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches persist between builds (BuildKit); the binary is copied out of
# the cached target directory, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin latchkey \
    && cp target/release/latchkey /usr/local/bin/latchkey

# distroless/cc: glibc, libgcc and CA certificates, no shell, no package manager. The :nonroot
# variant runs as uid/gid 65532, the user the chart's securityContext names.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="latchkey" \
      org.opencontainers.image.description="Ephemeral credential broker: CI OIDC tokens in, short-lived scoped credentials out" \
      org.opencontainers.image.source="https://github.com/latchkey-dev/latchkey" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/latchkey /usr/local/bin/latchkey
USER 65532:65532
# 8443: the API (server.listen); 9090: /healthz, /readyz, /metrics (server.admin_listen).
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/latchkey"]
CMD ["serve", "--config", "/etc/latchkey/latchkey.toml"]
