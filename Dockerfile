# Multi-stage: a static (musl) binary on Alpine with both iptables flavours and nft.
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member (the test harness): cargo reads every member's manifest.
COPY crates ./crates
# Rust on Alpine targets musl and links statically; the release profile strips.
RUN cargo build --release --locked --bin ip-masq-agent

FROM alpine:3.20
# iptables: iptables-nft and xtables-nft-multi; iptables-legacy: the legacy flavour;
# nftables: nft for --backend=nftables. The agent picks the flavour kubelet uses.
RUN apk add --no-cache iptables iptables-legacy nftables
COPY --from=build /src/target/release/ip-masq-agent /usr/local/bin/ip-masq-agent
USER 0
ENTRYPOINT ["/usr/local/bin/ip-masq-agent"]
