#!/usr/bin/env bash
# Generate the Python gRPC stubs from proto/ into service/pb/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
out=service/pb
if [ -f "$out/nextword/v1/nextword_pb2_grpc.py" ] && [ "$out/nextword/v1/nextword_pb2_grpc.py" -nt proto/nextword/v1/nextword.proto ]; then
    exit 0
fi
rm -rf "$out" && mkdir -p "$out/nextword/v1"
"$VENV/bin/python" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" proto/nextword/v1/nextword.proto
# protoc writes absolute imports (from nextword.v1 import ...); make them package-relative.
sed -i 's/^from nextword\.v1 import/from service.pb.nextword.v1 import/' "$out/nextword/v1/nextword_pb2_grpc.py"
touch "$out/__init__.py" "$out/nextword/__init__.py" "$out/nextword/v1/__init__.py"
echo "install: generated gRPC stubs in $out" >&2
