#!/usr/bin/env python3
"""Turns a .cu file into C++ for the CUDA emulation (see cuda_emu.h).

  K<<<grid, block[, smem[, stream]]>>>(args)  ->  ::emu::Launch(grid, block, ...).With(K, "K")(args)
  extern __shared__ T name[];                 ->  T* name = static_cast<T*>(::emu::DynamicShared());

Usage: cu_to_emu.py IN.cu > OUT.cc
"""
import re
import sys


def main():
    src = open(sys.argv[1]).read()
    launches = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
    src, n = launches.subn(lambda m: "::emu::Launch(%s).With(%s, \"%s\")(" % (m.group(2), m.group(1), re.sub(r"\s+", " ", m.group(1))), src)
    shared = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
    src = shared.sub(r"\1* \2 = static_cast<\1*>(::emu::DynamicShared());", src)
    if "<<<" in src:
        sys.exit("cu_to_emu: a launch was not recognised in " + sys.argv[1])
    sys.stdout.write('#include "engine/cuda/emu/cuda_emu.h"\n// Generated from %s by cu_to_emu.py'
                     ' (%d launches).\n#line 1 "%s"\n' % (sys.argv[1], n, sys.argv[1]))
    sys.stdout.write(src)


if __name__ == "__main__":
    main()
