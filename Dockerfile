# Multi-stage build of planner-svc; the runtime image runs as a non-root user.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p planner-svc

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/planner planner \
    && mkdir -p /var/lib/planner && chown planner /var/lib/planner
COPY --from=build /src/target/release/planner-svc /usr/local/bin/planner-svc
COPY config/planner.toml /etc/planner/planner.toml
USER planner
WORKDIR /var/lib/planner
ENV PLANNER_CONFIG=/etc/planner/planner.toml
ENTRYPOINT ["planner-svc"]
CMD ["serve"]
