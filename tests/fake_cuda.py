"""A stand-in for libcuda.so.1 with the calls augserve.transport.cuda_ipc makes, for machines
without a GPU: "device memory" is a shared-memory file (/dev/shm/augserve-fake-cuda-PID-N) mapped
into each process, and an IPC handle carries its name. The handle is passed by value, as the
real driver takes it, so wrong ctypes plumbing reads garbage here too. Unlike the real driver it
lets a process open its own handle, so a server and its client may share one test process."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FAKE_DRIVER = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { char name[48]; uint64_t size; } Named;
static const char *error_name = "CUDA_ERROR_FAKE";
static int counter = 0;
int cuInit(unsigned flags) { return 0; }
int cuGetErrorName(int status, const char **name) { *name = error_name; return 0; }
int cuDeviceGetCount(int *count) { *count = 1; return 0; }
int cuDeviceGet(int *device, int ordinal) { if (ordinal != 0) return 101; *device = 0; return 0; }
int cuDeviceGetUuid(unsigned char *uuid, int device) { memset(uuid, 0xAB, 16); return 0; }
int cuDevicePrimaryCtxRetain(void **context, int device) { *context = (void *)0x1; return 0; }
int cuDevicePrimaryCtxRelease_v2(int device) { return 0; }
int cuCtxPushCurrent_v2(void *context) { return context == (void *)0x1 ? 0 : 201; }
int cuCtxPopCurrent_v2(void **context) { *context = (void *)0x1; return 0; }
static Named names[64]; static void *bases[64];
int cuMemAlloc_v2(uint64_t *pointer, size_t size) {
    if (counter >= 64) return 2;
    int slot = counter++;
    snprintf(names[slot].name, sizeof names[slot].name, "/augserve-fake-cuda-%d-%d", getpid(), slot);
    names[slot].size = size;
    int fd = shm_open(names[slot].name, O_CREAT | O_RDWR, 0600);
    if (fd < 0 || ftruncate(fd, size) != 0) return 2;
    bases[slot] = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    *pointer = (uint64_t)bases[slot];
    return 0;
}
int cuMemFree_v2(uint64_t pointer) {
    for (int slot = 0; slot < counter; slot++)
        if ((uint64_t)bases[slot] == pointer) { munmap(bases[slot], names[slot].size); shm_unlink(names[slot].name); bases[slot] = 0; return 0; }
    return 1;
}
int cuIpcGetMemHandle(CUipcMemHandle *handle, uint64_t pointer) {
    for (int slot = 0; slot < counter; slot++)
        if ((uint64_t)bases[slot] == pointer) { memset(handle, 0, sizeof *handle); memcpy(handle, &names[slot], sizeof(Named)); return 0; }
    return 1;
}
int cuIpcOpenMemHandle_v2(uint64_t *pointer, CUipcMemHandle handle, unsigned flags) {
    Named named; memcpy(&named, &handle, sizeof named);
    int fd = shm_open(named.name, O_RDWR, 0600);
    if (fd < 0) return 400;
    void *base = mmap(0, named.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    *pointer = (uint64_t)base;
    return base == MAP_FAILED ? 2 : 0;
}
int cuIpcCloseMemHandle(uint64_t pointer) { return 0; }
int cuMemcpyHtoD_v2(uint64_t destination, const void *source, size_t size) { memcpy((void *)destination, source, size); return 0; }
int cuMemcpyDtoH_v2(void *destination, uint64_t source, size_t size) { memcpy(destination, (void *)source, size); return 0; }
"""


def build_fake_driver(folder: Path) -> str | None:
    """Compile the stand-in into `folder`; its path, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    (folder / "fake_cuda.c").write_text(FAKE_DRIVER)
    library = folder / "libfakecuda.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(folder / "fake_cuda.c"), "-lrt"], check=True)
    return str(library)


def fake_device_files(pid: int) -> list[Path]:
    """The stand-in's live allocations made by process `pid`."""
    return sorted(Path("/dev/shm").glob(f"augserve-fake-cuda-{pid}-*"))
