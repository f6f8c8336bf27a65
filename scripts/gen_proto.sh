#!/usr/bin/env bash
# Generate the Python gRPC stubs from proto/ into service/pb/ (not committed).
# The code generator (grpcio-tools) is a build tool, not a runtime package: when the virtual
# environment lacks it (a serve-only install, the Docker image), it is installed, pinned by
# constraints.txt, into build/protoc/ and used from there, so the served environment never holds it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
out=service/pb
if [ -f "$out/nextword/v1/nextword_pb2_grpc.py" ] && [ "$out/nextword/v1/nextword_pb2_grpc.py" -nt proto/nextword/v1/nextword.proto ]; then
    exit 0
fi
python="$VENV/bin/python"
if ! "$python" -c 'import grpc_tools' 2>/dev/null; then
    tools=build/protoc
    if ! PYTHONPATH="$tools" "$python" -c 'import grpc_tools' 2>/dev/null; then
        echo "install: installing the stub generator (grpcio-tools) into $tools" >&2
        "$python" -m pip install --quiet --disable-pip-version-check --target "$tools" \
            --constraint constraints.txt "grpcio-tools"
    fi
    export PYTHONPATH="$tools"
fi
# google/api/annotations.proto (the HTTP routes) comes with googleapis-common-protos, a runtime dependency
common=$("$VENV/bin/python" -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')
rm -rf "$out" && mkdir -p "$out/nextword/v1"
"$python" -m grpc_tools.protoc -I proto -I "$common" --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" proto/nextword/v1/nextword.proto
# protoc writes absolute imports (from nextword.v1 import ...); make them package-relative.
sed -i 's/^from nextword\.v1 import/from service.pb.nextword.v1 import/' "$out/nextword/v1/nextword_pb2_grpc.py"
touch "$out/__init__.py" "$out/nextword/__init__.py" "$out/nextword/v1/__init__.py"
echo "install: generated gRPC stubs in $out" >&2
