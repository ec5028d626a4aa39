# The operator's image (the agent runs natively on Macs, never in a container).
# Build and push it to your registry, then point the chart at it:
#   docker build -t registry.example.com/orchardist:0.1.0 . && docker push registry.example.com/orchardist:0.1.0
#   helm install orchardist charts/orchardist -n orchardist-system --create-namespace \
#     --set image.repository=registry.example.com/orchardist --set image.tag=0.1.0
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY agent ./agent
COPY crds ./crds
COPY charts ./charts
COPY examples ./examples
RUN pip wheel --no-deps --wheel-dir /wheels . && pip wheel --wheel-dir /wheels /wheels/orchardist-*.whl

FROM python:3.12-slim
RUN useradd --uid 65532 --no-create-home orchardist
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels orchardist && rm -rf /wheels
USER 65532
ENTRYPOINT ["orchardist"]
CMD ["operator", "run", "--all-namespaces", "--log-format", "json"]
