# agentvm controller image. It talks to the host's libvirt through its socket:
#   docker run -v /run/libvirt:/run/libvirt -v /var/lib/agentvm:/var/lib/agentvm \
#              -v /var/cache/agentvm:/var/cache/agentvm -v "$PWD/specs:/specs" agentvm controller --spec-dir /specs
# Guest files (overlays, images) must be at the same paths inside and outside the container,
# because libvirtd on the host opens them.

FROM rust:1-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p agentvm \
 && install -m 0755 target/release/agentvm /usr/local/bin/agentvm

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 qemu-utils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/agentvm /usr/local/bin/agentvm
ENTRYPOINT ["/usr/local/bin/agentvm"]
CMD ["--help"]
