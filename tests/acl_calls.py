"""Raw calls into the ACL runtime double (ctypes, no sleepd), one role per process,
to show which calls the double refuses. Each step prints "<step> <aclError>".

    python acl_calls.py exporter   allocates, exports twice, tries to import its own
                                   token, then authorises each pid read from stdin
    python acl_calls.py importer TOKEN SIZE
                                   prints its pid, waits for a line on stdin, then
                                   imports and tries the mappings and copies the runtime refuses
"""

import ctypes
import os
import sys

ACL_MEM_LOCATION_TYPE_DEVICE, ACL_HBM_MEM, ACL_MEMCPY_DEFAULT = 1, 1, 4  # acl_rt.h


class Location(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]


class Prop(ctypes.Structure):
    _fields_ = [("handleType", ctypes.c_int), ("allocationType", ctypes.c_int), ("memAttr", ctypes.c_int),
                ("location", Location), ("reserve", ctypes.c_uint64)]


acl = ctypes.CDLL(os.environ["SLEEPD_LIBACL"])
SIZE = 2 << 20


def step(name: str, error: int) -> None:
    print(name, error, flush=True)


def malloc():
    handle = ctypes.c_void_p()
    prop = Prop(0, 0, ACL_HBM_MEM, Location(0, ACL_MEM_LOCATION_TYPE_DEVICE), 0)
    step("malloc", acl.aclrtMallocPhysical(ctypes.byref(handle), ctypes.c_size_t(SIZE), ctypes.byref(prop),
                                           ctypes.c_uint64(0)))
    return handle


def export(handle, name: str) -> int:
    token = ctypes.c_uint64()
    step(name, acl.aclrtMemExportToShareableHandle(handle, 0, ctypes.c_uint64(0), ctypes.byref(token)))
    return token.value


def import_token(token: int, name: str):
    handle = ctypes.c_void_p()
    step(name, acl.aclrtMemImportFromShareableHandle(ctypes.c_uint64(token), 0, ctypes.byref(handle)))
    return handle


def exporter() -> None:
    acl.aclInit(None)
    acl.aclrtSetDevice(0)
    handle = malloc()
    token = export(handle, "export")
    export(handle, "export_again")
    import_token(token, "import_in_exporter")
    print("token", token, flush=True)
    for line in sys.stdin:
        pids = (ctypes.c_int32 * 1)(int(line))
        step("authorize", acl.aclrtMemSetPidToShareableHandle(ctypes.c_uint64(token), pids, ctypes.c_size_t(1)))


def importer(token: int) -> None:
    acl.aclInit(None)
    print("pid", os.getpid(), flush=True)
    sys.stdin.readline()
    handle = ctypes.c_void_p()
    step("import_without_device", acl.aclrtMemImportFromShareableHandle(ctypes.c_uint64(token), 0, ctypes.byref(handle)))
    acl.aclrtSetDevice(0)
    handle = import_token(token, "import")
    if not handle.value:
        return
    import_token(token, "import_again")
    export(handle, "export_imported")
    base = ctypes.c_void_p()
    acl.aclrtReserveMemAddress(ctypes.byref(base), ctypes.c_size_t(2 * SIZE), ctypes.c_size_t(0), None,
                               ctypes.c_uint64(0))
    step("map_partial", acl.aclrtMapMem(base, ctypes.c_size_t(SIZE // 2), ctypes.c_size_t(0), handle, ctypes.c_uint64(0)))
    step("map_at_offset", acl.aclrtMapMem(base, ctypes.c_size_t(SIZE // 2), ctypes.c_size_t(SIZE // 2), handle,
                                          ctypes.c_uint64(0)))
    step("map", acl.aclrtMapMem(base, ctypes.c_size_t(SIZE), ctypes.c_size_t(0), handle, ctypes.c_uint64(0)))
    local = malloc()
    step("map_local_beside_imported", acl.aclrtMapMem(ctypes.c_void_p(base.value + SIZE), ctypes.c_size_t(SIZE),
                                                      ctypes.c_size_t(0), local, ctypes.c_uint64(0)))
    buffer = ctypes.create_string_buffer(SIZE)
    step("copy_over_dest_max", acl.aclrtMemcpy(base, ctypes.c_size_t(16), buffer, ctypes.c_size_t(17),
                                               ACL_MEMCPY_DEFAULT))
    step("copy", acl.aclrtMemcpy(base, ctypes.c_size_t(16), buffer, ctypes.c_size_t(16), ACL_MEMCPY_DEFAULT))
    step("free_while_mapped", acl.aclrtFreePhysical(handle))


if __name__ == "__main__":
    exporter() if sys.argv[1] == "exporter" else importer(int(sys.argv[2]))
