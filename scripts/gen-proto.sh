#!/usr/bin/env bash
# Generate proxy/_pb from proto/ deterministically (pinned grpcio-tools and mypy-protobuf).
set -euo pipefail
: "${PB_OUT:=proxy/_pb}" "${PY:=.venv/bin/python}"
mkdir -p "$PB_OUT"
find "$PB_OUT" -name '*_pb2*.py*' -delete
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$PB_OUT" --grpc_python_out="$PB_OUT" \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  --mypy_out="$PB_OUT" --mypy_grpc_out="$PB_OUT" \
  $(find proto -name "*.proto" | sort)
# Make the generated modules importable as a subpackage of `proxy._pb`.
find "$PB_OUT" -name '*.py' -o -name '*.pyi' | while read -r f; do
  sed -i -E 's/^from kernel_events\.v1 import /from . import /; s/^import kernel_events\.v1\.([a-z_0-9]+)$/from . import \1/' "$f"
done
for d in "$PB_OUT" "$PB_OUT/kernel_events" "$PB_OUT/kernel_events/v1"; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
