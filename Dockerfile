# nextword service image.
#   CPU (default):  docker build -t nextword .
#   CUDA:           docker build -t nextword:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                   docker run --gpus all -p 50051:50051 nextword:cuda --model /app/models/default.pt --device cuda
# The build stage installs with scripts/install.sh, the same script CI runs (make install / make test).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY scripts/ scripts/
COPY proto/ proto/
COPY service/ service/
RUN VENV=/opt/venv TORCH_INDEX_URL="${TORCH_INDEX_URL}" scripts/install.sh serve \
    && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 nextword \
    && useradd --system --uid 10001 --gid 10001 --no-create-home nextword \
    && mkdir /data && chown 10001:10001 /data
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/service/ service/
COPY --from=build /app/pyproject.toml ./
COPY models/default.pt models/default.pt
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# personal histories (SQLite): mount a volume here to keep them across containers
VOLUME ["/data"]
# 50051: gRPC; 9464: Prometheus /metrics (keep it on a private network)
EXPOSE 50051 9464
# Through the standard gRPC health service (grpc.health.v1.Health/Check).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.client", "--target", "localhost:50051", "--timeout", "4", "health"]
# SIGTERM reaches python directly (exec form): health NOT_SERVING, in-flight calls drain, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service", "--host", "[::]", "--port", "50051"]
# Mount your own model and pass --model /models/yours.pt to use it; add --model zh=/models/zh.pt (from
# make zh-model) to serve Chinese beside English. The image listens on every interface, so it serves no
# personal history by default: turn it on with tokens bound to users (docs/history.md), for example
#   --history-db /data/nextword-history.sqlite --auth-token-file /run/secrets/nextword-tokens
# (or --history-db postgresql://... for several replicas, or --trust-user-header behind a proxy that
# authenticates every caller).
CMD ["--model", "/app/models/default.pt", "--history-db", "off"]
