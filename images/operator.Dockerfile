# kubemaas-operator: a static binary on distroless, non-root. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t kubemaas/operator:0.1.0 .
# (Not built in this project's CI: its machines have no Docker engine.)
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p kubemaas-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kubemaas-operator /kubemaas-operator
USER 65532:65532
EXPOSE 8090
ENTRYPOINT ["/kubemaas-operator"]
CMD ["run"]
