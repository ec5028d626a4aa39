# The operator's image (the agent runs natively on Macs, never in a container).
# Build and push it to your registry, then point the chart at it:
#   docker build -t registry.example.com/orchardist:0.1.0 . && docker push registry.example.com/orchardist:0.1.0
#   helm install orchardist charts/orchardist -n orchardist-system --create-namespace \
#     --set image.repository=registry.example.com/orchardist --set image.tag=0.1.0
# Every Python package comes from the lock (requirements/*.txt, exported from uv.lock), hash-checked:
# the image runs the versions the tests ran.
FROM python:3.12-slim AS build
WORKDIR /src
COPY requirements/build.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY agent ./agent
COPY crds ./crds
COPY charts ./charts
COPY examples ./examples
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --uid 65532 --no-create-home orchardist
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements/runtime.txt /tmp/runtime.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/runtime.txt && rm /tmp/runtime.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/orchardist-*.whl && rm -rf /wheels && pip check
USER 65532
ENTRYPOINT ["orchardist"]
CMD ["operator", "run", "--all-namespaces", "--log-format", "json"]
