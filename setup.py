"""Builds what pyproject.toml cannot declare: the native extension sleepd._C and
the gRPC code generated from proto/sleepd.proto."""

import os
import shutil
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithProto(build_py):
    """Generates sleepd_pb2*.py into the build tree; nothing generated is committed."""

    def run(self):
        super().run()
        from grpc_tools import protoc

        with tempfile.TemporaryDirectory() as include_root:
            # Placing the file at sleepd/proto/ makes the generated imports
            # package-qualified (`from sleepd.proto import sleepd_pb2`).
            package_dir = os.path.join(include_root, "sleepd", "proto")
            os.makedirs(package_dir)
            shutil.copy(os.path.join(HERE, "proto", "sleepd.proto"), package_dir)
            args = [
                "grpc_tools.protoc",
                f"-I{include_root}",
                f"-I{os.path.join(os.path.dirname(protoc.__file__), '_proto')}",
                f"--python_out={self.build_lib}",
                f"--pyi_out={self.build_lib}",
                f"--grpc_python_out={self.build_lib}",
                os.path.join(package_dir, "sleepd.proto"),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError("protoc failed on proto/sleepd.proto")


native = Pybind11Extension(
    "sleepd._C",
    sorted(os.path.join("csrc", name) for name in os.listdir(os.path.join(HERE, "csrc")) if name.endswith(".cpp")),
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra"],
    libraries=["dl"],
)

setup(ext_modules=[native], cmdclass={"build_py": BuildPyWithProto, "build_ext": build_ext})
