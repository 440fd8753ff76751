"""The CUDA engine built against the CPU emulation of the device (engine/cuda/emu)."""

load("@rules_cc//cc:defs.bzl", "cc_library")

def cuda_emu_engine(suffix = "", copts = []):
    """kernels_emu<suffix>, cuda_engine_emu<suffix> and backend_emu<suffix> (alwayslink), with
    `copts` on every source of the engine (e.g. a sanitizer's)."""
    cc_library(
        name = "kernels_emu" + suffix,
        srcs = [
            ":cuda_check_emu_cc",
            ":kernels_emu_cc",
        ],
        hdrs = [
            "cuda_check.h",
            "kernels.h",
        ],
        copts = copts + ["-Wno-unknown-pragmas"],
        tags = ["manual"],
        deps = [":emu_runtime"],
    )
    cc_library(
        name = "cuda_engine_emu" + suffix,
        srcs = ["cuda_engine.cc"],
        hdrs = ["cuda_engine.h"],
        copts = copts,
        tags = ["manual"],
        deps = [
            ":kernels_emu" + suffix,
            "//engine:dtype",
            "//engine:expert_groups",
            "//engine:model",
            "//third_party:absl",
        ],
    )
    cc_library(
        name = "backend_emu" + suffix,
        srcs = ["backend.cc"],
        tags = ["manual"],
        deps = [":cuda_engine_emu" + suffix],
        alwayslink = 1,
    )

def cuda_engine_test_deps(variant = ""):
    """The deps of cuda_engine_test.cc against the CUDA engine (variant "") or an emulated one
    ("_emu", "_emu_asan": cuda_emu_engine's suffix after "_emu")."""
    return [
        ":backend" + variant,
        ":cuda_engine" + variant,
        "//engine:arch",
        "//engine:argmax",
        "//engine:config",
        "//engine:model",
        "//engine/ops",
        "//third_party:gtest_main",
    ]
