"""A local buf plugin: protobuf's Python generator and gRPC's, as grpcio-tools bundles them.

protoc's Python generator is built into protoc, and gRPC's is linked into grpcio-tools; neither
is a separate plugin that `buf generate` could run, and buf's remote plugins are out of reach.
This plugin reads buf's CodeGeneratorRequest, hands its files (as a descriptor set) to the
protoc of grpcio-tools, and answers with what that wrote: the option `python` asks for the
`_pb2.py` files, `grpc` for the `_pb2_grpc.py` ones.

It runs in the generator's own environment (`make generate` makes it), whose pinned
grpcio-tools sets the versions the generated code demands at import: see buf.gen.yaml.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

OUTPUTS = {"python": "--python_out", "grpc": "--grpc_python_out"}


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    """Run grpcio-tools' protoc on the request's files; its output files become the answer."""
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    flag = OUTPUTS.get(request.parameter)
    if flag is None:
        response.error = f"opt must be one of {sorted(OUTPUTS)}, not {request.parameter!r}"
        return response
    with tempfile.TemporaryDirectory() as scratch:
        descriptors = Path(scratch) / "descriptors.binpb"
        out = Path(scratch) / "out"
        out.mkdir()
        files = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
        descriptors.write_bytes(files.SerializeToString())
        command = ["protoc", f"--descriptor_set_in={descriptors}", f"{flag}={out}"]
        if protoc.main([*command, *request.file_to_generate]) != 0:
            response.error = "grpcio-tools' protoc failed (its message is above)"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
