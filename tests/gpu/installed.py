"""Run by the acceptance venv's python after the install: sleepd imports, its
native part and generated gRPC code included, and this names what the venv
itself holds, which came from the wheelhouse."""

import importlib.metadata
import sysconfig

import sleepd._C
from sleepd.client import Controller, SleepClient, Waker  # noqa: F401
import sleepd.daemon.main  # noqa: F401
import sleepd.proto.sleepd_pb2_grpc  # noqa: F401

own = sysconfig.get_paths()["purelib"]
print(f"sleepd {importlib.metadata.version('sleepd')} imports from {sleepd._C.__file__}")
names = sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions(path=[own]))
print("installed into the venv: " + ", ".join(names))
