"""Compiles .proto files with the system's protoc and grpc_cpp_plugin (Debian packages)."""

load("@rules_cc//cc:defs.bzl", "cc_library")

def moemesh_proto_library(name, srcs, deps = [], proto_deps = [], grpc = True, visibility = None):
    """Generates C++ messages (and gRPC stubs when grpc=True) for `srcs`.

    Args:
      name: the cc_library that holds the generated code.
      srcs: .proto files of this package.
      deps: other moemesh_proto_library targets whose protos these import.
      proto_deps: the .proto files of `deps` (protoc needs them on its path).
      grpc: whether to generate service stubs (*.grpc.pb.{h,cc}).
      visibility: of the cc_library.
    """
    outs_h = []
    outs_cc = []
    for src in srcs:
        base = src[:-len(".proto")]
        outs_h.append(base + ".pb.h")
        outs_cc.append(base + ".pb.cc")
        if grpc:
            outs_h.append(base + ".grpc.pb.h")
            outs_cc.append(base + ".grpc.pb.cc")
    pkg = native.package_name()
    grpc_flags = ""
    if grpc:
        grpc_flags = "--grpc_out=$(GENDIR) --plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin "
    native.genrule(
        name = name + "_gen",
        srcs = srcs + proto_deps,
        outs = outs_h + outs_cc,
        cmd = "/usr/bin/protoc -I. --cpp_out=$(GENDIR) " + grpc_flags +
              " ".join([pkg + "/" + s for s in srcs]),
    )
    cc_library(
        name = name,
        srcs = outs_cc,
        hdrs = outs_h,
        deps = deps + ["//third_party:protobuf"] + (["//third_party:grpc"] if grpc else []),
        visibility = visibility,
    )
