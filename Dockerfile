# kas, agentk and kasctl in one small image, running as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p kas -p agentk -p kasctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kas /src/target/release/agentk /src/target/release/kasctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT []
CMD ["kas", "--help"]
