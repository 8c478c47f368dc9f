"""sleepd declares its own slice of the CUDA driver API (csrc/cuda_driver.h) so that
it builds without a CUDA toolkit. Where a toolkit is installed its cuda.h is the
truth, and these tests compile our slice against it: struct layouts, constants,
signatures, and the versioned symbol each entry point is resolved by.

The driver double (tests/fakecuda/fakecuda.cpp) checks, whenever it is built, that
it exports every entry point sleepd resolves with the type sleepd calls it through;
with the check here, its signatures are cuda.h's. NVML needs no such check: sleepd
declares none of NVML itself, nvidia-ml-py does.
"""

import os
import re
import subprocess

import pytest

from support import HERE

CSRC = os.path.join(os.path.dirname(HERE), "csrc")
CHECK = os.path.join(HERE, "fakecuda", "check_cuda_h.cpp")
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

needs_toolkit = pytest.mark.skipif(not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda.h")),
                                   reason=f"no CUDA toolkit here: {CUDA_INCLUDE}/cuda.h is missing")


def check(*flags: str, csrc: str = CSRC) -> subprocess.CompletedProcess:
    return subprocess.run(["g++", "-std=c++17", "-fsyntax-only", f"-I{csrc}", f"-I{CUDA_INCLUDE}", *flags, CHECK],
                          capture_output=True, text=True)


@needs_toolkit
def test_our_driver_declarations_are_the_ones_in_cuda_h():
    result = check()
    assert result.returncode == 0, result.stderr


@needs_toolkit
def test_a_superseded_entry_point_sleepd_calls_on_purpose_has_its_old_signature():
    result = check("-D__CUDA_API_VERSION_INTERNAL")
    assert result.returncode == 0, result.stderr


@needs_toolkit
@pytest.mark.parametrize("ours, mistake, error", [
    ("X(cuDeviceGetUuid, cuDeviceGetUuid_v2,", "X(cuDeviceGetUuid, cuDeviceGetUuid,",
     "cuda_driver.h resolves cuDeviceGetUuid, but cuda.h maps cuDeviceGetUuid to cuDeviceGetUuid_v2"),
    ("X(cuMemUnmap, cuMemUnmap, CUresult, CUdeviceptr, size_t)", "X(cuMemUnmap, cuMemUnmap, CUresult, CUdeviceptr, int)",
     "cuMemUnmap: the signature in cuda_driver.h is not cuda.h's"),
    ("unsigned short usage;", "unsigned int usage;", "CUmemAllocationProp.allocFlags.usage differs"),
    ("CU_MEMHOSTREGISTER_PORTABLE = 0x01", "CU_MEMHOSTREGISTER_PORTABLE = 0x02",
     "CU_MEMHOSTREGISTER_PORTABLE is not cuda.h's value"),
], ids=["unversioned symbol", "signature", "struct field", "constant"])
def test_the_check_catches_a_declaration_that_differs_from_cuda_h(tmp_path, ours, mistake, error):
    header = open(os.path.join(CSRC, "cuda_driver.h")).read()
    assert ours in header
    (tmp_path / "cuda_driver.h").write_text(header.replace(ours, mistake))
    result = check(csrc=str(tmp_path))
    assert result.returncode != 0
    assert error in result.stderr


def resolved_symbols() -> set[str]:
    """What sleepd looks up with dlsym, read from cuda_driver.h by the preprocessor."""
    source = ('#include "cuda_driver.h"\n#define SYMBOL(name, symbol, ...) symbol\n'
              "SLEEPD_CUDA_ENTRY_POINTS(SYMBOL) SLEEPD_CUDA_SUPERSEDED_ENTRY_POINTS(SYMBOL)\n")
    result = subprocess.run(["g++", "-std=c++17", "-E", "-P", f"-I{CSRC}", "-x", "c++", "-"], input=source,
                            capture_output=True, text=True, check=True)
    return set(result.stdout.split("\n")[-2].split())


def test_the_driver_double_exports_only_entry_points_whose_type_is_checked(fake_cuda):
    listing = subprocess.run(["nm", "-D", "--defined-only", fake_cuda], capture_output=True, text=True, check=True)
    exported = {m.group(1) for m in re.finditer(r" T (cu\w+)$", listing.stdout, re.MULTILINE)}
    assert "cuDeviceGetUuid_v2" in exported
    assert exported == resolved_symbols()
