# The testrun-controller image: one statically linked, stripped executable
# on an empty base with a CA bundle, run as uid 65532, with an SBOM of its
# crate graph at /sbom/. The same file is the agent every VM fetches from the controller.
#
#   docker build -t REGISTRY/testrun-controller:TAG .
#
# scripts/image.sh builds this file's final stage (from the last
# `FROM scratch`) without a daemon, from an executable built on the machine:
# it copies from target/image/ what this stage copies from the build stage.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN bash scripts/build-static.sh /out

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="testrun-controller" \
      org.opencontainers.image.description="Kubernetes controller that runs CI test jobs on ephemeral Compute Engine VMs and keeps warm pools of prebuilt VMs" \
      org.opencontainers.image.source="https://github.com/testrun-controller/testrun-controller" \
      org.opencontainers.image.url="https://github.com/testrun-controller/testrun-controller" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/testrun-controller /testrun-controller
COPY --from=build /out/sbom/ /sbom/
COPY --from=build /out/etc/ /etc/
USER 65532:65532
ENTRYPOINT ["/testrun-controller"]
CMD ["run"]
