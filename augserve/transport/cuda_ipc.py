"""CUDA IPC slots: batches in device memory that a trainer on the same host and GPU maps.

The server allocates one device buffer of `slot_count` slots (`CudaIpcRing`), writes each
batch into a slot on the GPU (a DALI GPU pipeline's output, device to device:
`DaliBackend.augment_to_device(..., ring.slot_pointer(slot))`) and sends the buffer's IPC handle
(64 bytes, once per stream), the device's UUID and the slot number. The trainer opens the handle
(`CudaIpcMapping`) and reads the slot in place: no copy and no trip through host memory. CUDA
allows this only between two processes on the same physical device (a process cannot open its
own handle), so a trainer finds its device by UUID (`device_with_uuid`), whatever ordinals
CUDA_VISIBLE_DEVICES gives each side.

The CUDA driver API is called through ctypes (`libcuda.so.1`, installed by every NVIDIA driver;
AUGSERVE_CUDA_DRIVER names another file), in each device's primary context (the one PyTorch,
CuPy and DALI share), so neither side needs a CUDA toolkit or torch. `CudaSlot` has
`__cuda_array_interface__`: `torch.as_tensor(slot, device="cuda")` wraps it without a copy.

As a Stream transport (TRANSPORT_CUDA_IPC) the ring is a producer's: the handle travels in
SessionInfo and Batch, the slot in Batch, and the trainer releases slots as on shared memory.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from augserve.core.errors import LimitError

IPC_HANDLE_BYTES = 64
UUID_BYTES = 16
DRIVER_LIBRARY_VARIABLE = "AUGSERVE_CUDA_DRIVER"
CUDA_SUCCESS = 0
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


class DeviceRingExhausted(LimitError):
    """The GPU cannot hold a CUDA IPC ring of `needed_bytes` (nothing was allocated)."""

    def __init__(self, needed_bytes: int, device: int, error: CudaError) -> None:
        super().__init__(
            f"GPU {device} cannot hold this stream's CUDA IPC ring of {needed_bytes} bytes "
            f"({needed_bytes / 2**20:.1f} MiB): {error}; use transport=\"shared_memory\""
        )
        self.needed_bytes = needed_bytes


class IpcMemHandle(ctypes.Structure):
    """CUipcMemHandle: 64 opaque bytes, passed by value to cuIpcOpenMemHandle."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class CudaDriver:
    """The few CUDA driver calls the IPC slots need, checked."""

    _shared: CudaDriver | None = None
    _shared_lock = threading.Lock()

    def __init__(self, library: str = "libcuda.so.1") -> None:
        self._cuda = ctypes.CDLL(library)
        pointer = ctypes.POINTER
        # The calls whose arguments ctypes would not pass right by itself (64-bit device
        # pointers, the handle by value).
        self._cuda.cuIpcGetMemHandle.argtypes = [pointer(IpcMemHandle), ctypes.c_uint64]
        self._cuda.cuIpcOpenMemHandle_v2.argtypes = [
            pointer(ctypes.c_uint64),
            IpcMemHandle,
            ctypes.c_uint,
        ]
        self._cuda.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
        self._cuda.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        self._cuda.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        self._cuda.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        self._check(self._cuda.cuInit(0), "cuInit")

    @classmethod
    def shared(cls) -> CudaDriver:
        """One driver per process (OSError without libcuda, CudaError without a device)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls(os.environ.get(DRIVER_LIBRARY_VARIABLE) or "libcuda.so.1")
            return cls._shared

    def _check(self, status: int, call: str) -> None:
        if status != CUDA_SUCCESS:
            name = ctypes.c_char_p()
            self._cuda.cuGetErrorName(status, ctypes.byref(name))
            text = name.value.decode() if name.value else f"error {status}"
            raise CudaError(f"{call} failed: {text}")

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._check(self._cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return count.value

    def device_uuid(self, ordinal: int) -> bytes:
        uuid = (ctypes.c_ubyte * 16)()
        self._check(self._cuda.cuDeviceGetUuid(uuid, self._device(ordinal)), "cuDeviceGetUuid")
        return bytes(uuid)

    def _device(self, ordinal: int) -> ctypes.c_int:
        device = ctypes.c_int()
        self._check(
            self._cuda.cuDeviceGet(ctypes.byref(device), ordinal), f"cuDeviceGet({ordinal})"
        )
        return device

    @contextmanager
    def context(self, ordinal: int) -> Iterator[None]:
        """The device's primary context, current on this thread for the block."""
        device = self._device(ordinal)
        context = ctypes.c_void_p()
        self._check(
            self._cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device),
            "cuDevicePrimaryCtxRetain",
        )
        try:
            self._check(self._cuda.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
            try:
                yield
            finally:
                self._cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            self._cuda.cuDevicePrimaryCtxRelease_v2(device)

    def allocate(self, size: int) -> int:
        pointer = ctypes.c_uint64()
        self._check(
            self._cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size)),
            f"cuMemAlloc({size})",
        )
        return pointer.value

    def free(self, pointer: int) -> None:
        self._check(self._cuda.cuMemFree_v2(pointer), "cuMemFree")

    def ipc_handle(self, pointer: int) -> bytes:
        handle = IpcMemHandle()
        self._check(
            self._cuda.cuIpcGetMemHandle(ctypes.byref(handle), pointer), "cuIpcGetMemHandle"
        )
        return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)

    def ipc_open(self, handle: bytes) -> int:
        if len(handle) != IPC_HANDLE_BYTES:
            raise ValueError(f"handle: expected {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        pointer = ctypes.c_uint64()
        raw = IpcMemHandle.from_buffer_copy(handle)
        self._check(
            self._cuda.cuIpcOpenMemHandle_v2(
                ctypes.byref(pointer), raw, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
            ),
            "cuIpcOpenMemHandle",
        )
        return pointer.value

    def ipc_close(self, pointer: int) -> None:
        self._check(self._cuda.cuIpcCloseMemHandle(pointer), "cuIpcCloseMemHandle")

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        source = np.ascontiguousarray(array)
        self._check(
            self._cuda.cuMemcpyHtoD_v2(pointer, source.ctypes.data, source.nbytes), "cuMemcpyHtoD"
        )

    def to_host(self, out: np.ndarray, pointer: int) -> None:
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        self._check(
            self._cuda.cuMemcpyDtoH_v2(out.ctypes.data, pointer, out.nbytes), "cuMemcpyDtoH"
        )


def cuda_ipc_unavailable(ordinal: int = 0) -> str | None:
    """Why CUDA IPC cannot run here (no driver, no such device), or None when it can."""
    try:
        driver = CudaDriver.shared()
    except OSError as error:
        return f"no CUDA driver ({error})"
    except CudaError as error:
        return str(error)
    try:
        count = driver.device_count()
    except CudaError as error:
        return str(error)
    if ordinal >= count:
        return f"no CUDA device {ordinal} ({count} visible)"
    return None


def device_with_uuid(uuid: bytes, driver: CudaDriver | None = None) -> int:
    """The ordinal this process sees the device `uuid` as; LookupError when it does not."""
    driver = driver or CudaDriver.shared()
    for ordinal in range(driver.device_count()):
        if driver.device_uuid(ordinal) == uuid:
            return ordinal
    raise LookupError(
        f"no visible CUDA device has UUID {uuid.hex()}: the trainer is not on the server's GPU"
    )


@dataclass(frozen=True)
class CudaIpcDevice:
    """The GPU a server keeps CUDA IPC batches on: its ordinal here and its UUID everywhere."""

    ordinal: int
    uuid: bytes


def cuda_ipc_device(ordinal: int) -> CudaIpcDevice:
    """Device `ordinal` as CUDA IPC rings name it; CudaError (or OSError) where it cannot be."""
    reason = cuda_ipc_unavailable(ordinal)
    if reason is not None:
        raise CudaError(reason)
    return CudaIpcDevice(ordinal, CudaDriver.shared().device_uuid(ordinal))


@dataclass(frozen=True)
class CudaSlot:
    """[N, H, W, 3] uint8 at a device pointer of GPU `device` (this process's ordinal);
    `__cuda_array_interface__` for torch or CuPy, `to_host()` for a numpy copy."""

    pointer: int
    shape: tuple[int, ...]
    device: int = 0
    driver: CudaDriver | None = field(default=None, compare=False, repr=False)

    def to_host(self, out: np.ndarray | None = None) -> np.ndarray:
        """The slot's bytes copied into `out` (C-contiguous uint8 of its shape) or a new array."""
        out = np.empty(self.shape, np.uint8) if out is None else out
        if out.shape != self.shape or out.dtype != np.uint8:
            raise ValueError(f"out is {out.dtype} {out.shape}, the slot uint8 {self.shape}")
        driver = self.driver or CudaDriver.shared()
        with driver.context(self.device):
            driver.to_host(out, self.pointer)
        return out

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": self.shape,
            "typestr": "|u1",
            "data": (self.pointer, False),
            "version": 3,
            "strides": None,
        }


@dataclass(frozen=True)
class RingHandle:
    """What a trainer needs to map a ring: send it once per stream."""

    ipc_handle: bytes
    device_uuid: bytes
    slot_count: int
    slot_bytes: int


class CudaIpcRing:
    """The server's side: `slot_count` slots of `slot_bytes` in one allocation on `device`."""

    def __init__(
        self, slot_count: int, slot_bytes: int, device: int = 0, driver: CudaDriver | None = None
    ) -> None:
        if slot_count < 1 or slot_bytes < 1:
            raise ValueError(
                f"slot_count {slot_count} and slot_bytes {slot_bytes} must be positive"
            )
        self.driver = driver or CudaDriver.shared()
        self.device = device
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        with self.driver.context(device):
            try:
                self.base = self.driver.allocate(slot_count * slot_bytes)
            except CudaError as error:
                raise DeviceRingExhausted(slot_count * slot_bytes, device, error) from None
            self.handle = RingHandle(
                self.driver.ipc_handle(self.base),
                self.driver.device_uuid(device),
                slot_count,
                slot_bytes,
            )

    def slot_pointer(self, slot: int) -> int:
        if not 0 <= slot < self.slot_count:
            raise IndexError(f"slot {slot} is outside [0, {self.slot_count})")
        return self.base + slot * self.slot_bytes

    def write(self, slot: int, array: np.ndarray) -> None:
        """Copy a host array into `slot` (where no GPU pipeline writes it)."""
        if array.nbytes > self.slot_bytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a slot of {self.slot_bytes}")
        with self.driver.context(self.device):
            self.driver.to_device(self.slot_pointer(slot), array)

    def close(self) -> None:
        """Free the buffer (a trainer still mapping it keeps it until it closes its mapping)."""
        if self.base:
            with self.driver.context(self.device):
                self.driver.free(self.base)
            self.base = 0


class CudaIpcMapping:
    """The trainer's side: the server's ring, opened on the same device."""

    def __init__(self, handle: RingHandle, driver: CudaDriver | None = None) -> None:
        self.driver = driver or CudaDriver.shared()
        self.handle = handle
        self.device = device_with_uuid(handle.device_uuid, self.driver)
        with self.driver.context(self.device):
            self.base = self.driver.ipc_open(handle.ipc_handle)

    def slot(self, slot: int, shape: tuple[int, ...]) -> CudaSlot:
        """A view of `slot` as uint8 `shape`; valid until the server reuses the slot."""
        if not 0 <= slot < self.handle.slot_count:
            raise IndexError(f"slot {slot} is outside [0, {self.handle.slot_count})")
        if int(np.prod(shape)) > self.handle.slot_bytes:
            raise ValueError(f"shape {shape} does not fit a slot of {self.handle.slot_bytes} bytes")
        return CudaSlot(self.base + slot * self.handle.slot_bytes, tuple(shape), self.device, self.driver)

    def read(self, slot: int, out: np.ndarray) -> np.ndarray:
        """Copy `slot`'s first out.nbytes bytes to the host array `out`."""
        return self.slot(slot, out.shape).to_host(out)

    def close(self) -> None:
        if self.base:
            with self.driver.context(self.device):
                self.driver.ipc_close(self.base)
            self.base = 0
