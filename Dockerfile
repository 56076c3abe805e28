# agentvm controller image. It talks to the host's libvirt through its socket:
#   docker run -v /run/libvirt:/run/libvirt -v /var/lib/agentvm:/var/lib/agentvm \
#              -v /var/cache/agentvm:/var/cache/agentvm -v "$PWD/specs:/specs" agentvm controller --spec-dir /specs
# Guest files (overlays, images) must be at the same paths inside and outside the container,
# because libvirtd on the host opens them. Building a guest image inside the container needs
# `--privileged` (debootstrap mounts and chroots); without it, build images on the host with
# `agentvm image build` and share /var/cache/agentvm.

FROM rust:1-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p agentvm -p agentvm-guest \
 && install -m 0755 target/release/agentvm target/release/agentvm-guest /usr/local/bin/

FROM debian:bookworm-slim
# What the controller runs on the host side: qemu-img (overlays), debootstrap, mkfs.ext4,
# mount/chroot and the guest kernel (image builds), tar and git (workspaces), virsh (doctor).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 libvirt-clients qemu-utils \
      ca-certificates debootstrap e2fsprogs tar git procps linux-image-cloud-amd64 \
 && rm -rf /var/lib/apt/lists/*
# agentvm-guest goes into every guest image the controller builds; it is looked for next to
# agentvm.
COPY --from=build /usr/local/bin/agentvm /usr/local/bin/agentvm-guest /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/agentvm"]
CMD ["--help"]
