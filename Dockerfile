# The operator's image (the agent runs natively on Macs, never in a container). `make image` builds
# the same image without a container engine; both run hack/build-image.sh, which stages three trees:
#   base  Debian bookworm's hack/image/debian-packages.txt, unpacked by mmdebstrap (no shell)
#   deps  requirements/runtime.txt (exported from uv.lock, hash-checked)
#   app   the project wheel, the launcher /usr/local/bin/orchardist, byte-code compiled ahead
# and the settings below (user, environment, command, label keys) equal orchardist.dev.image's, a
# test holds them equal. Build and push it elsewhere, then point the chart at it:
#   docker build --build-arg REVISION=$(git rev-parse HEAD) -t registry.example.com/orchardist:0.1.0 .
#   helm install orchardist charts/orchardist -n orchardist-system --create-namespace \
#     --set image.repository=registry.example.com/orchardist --set image.tag=0.1.0
FROM debian:bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      mmdebstrap python3 python3-venv ca-certificates \
 && python3 -m venv /venv
WORKDIR /src
COPY requirements/build.txt requirements/runtime.txt ./requirements/
RUN /venv/bin/pip install --no-cache-dir --require-hashes -r requirements/build.txt
COPY hack/build-image.sh ./hack/
COPY hack/image ./hack/image
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY agent ./agent
COPY crds ./crds
COPY charts ./charts
COPY examples ./examples
ARG SOURCE_DATE_EPOCH=0
RUN PYTHON=/venv/bin/python bash hack/build-image.sh --stage /out

FROM scratch
COPY --from=build /out/base/ /
COPY --from=build /out/deps/ /
COPY --from=build /out/app/ /
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="orchardist-operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://orchardist.invalid" \
      org.opencontainers.image.created="${CREATED}"
ENV PATH=/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["orchardist"]
CMD ["operator", "run", "--all-namespaces", "--log-format", "json"]
