"""Compiles .cu files with /usr/local/cuda/bin/nvcc (sm_90 SASS plus compute_90 PTX).

CUDA targets are tagged "manual": `bazel build //...` never needs nvcc. Build them by name with
`--config=cuda` (scripts/test.sh does when nvcc is present).
"""

load("@rules_cc//cc:defs.bzl", "cc_library")

NVCC = "/usr/local/cuda/bin/nvcc"
NVCC_FLAGS = (
    "-std=c++17 -O3 -Xcompiler=-fPIC " +
    "-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90"
)

def cuda_library(name, srcs, hdrs = [], deps = [], visibility = None):
    """A cc_library whose objects nvcc compiled from `srcs` (.cu). Includes resolve from the workspace root."""
    objs = []
    for src in srcs:
        obj = name + "_" + src.replace("/", "_").replace(".cu", ".o")
        native.genrule(
            name = obj + "_nvcc",
            srcs = [src] + hdrs,
            outs = [obj],
            cmd = NVCC + " " + NVCC_FLAGS + " -I. -I$(GENDIR) -c $(location " + src + ") -o $@",
            tags = ["manual"],
        )
        objs.append(obj)
    cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        deps = deps + ["@cuda//:cudart"],
        tags = ["manual"],
        visibility = visibility,
    )

def cuda_backend_deps():
    """Deps that link the CUDA device backend (--device=cuda) into a binary under --config=cuda."""
    return select({
        "//build_defs:cuda_enabled": ["//engine/cuda:backend"],
        "//conditions:default": [],
    })
