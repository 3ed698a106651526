"""The few CUDA driver calls that CUDA IPC needs, through ``ctypes`` on ``libcuda.so.1``.

We call the driver (``libcuda``, installed with the NVIDIA driver) rather than the runtime
(``libcudart``): wherever a GPU works ``libcuda.so.1`` is on the loader path, whereas each torch
wheel bundles its own runtime of its own CUDA version. Export works on any device pointer, not
only on a torch storage, so ``register(address, length, device)`` stays address-based like
every other transport. Each call runs with the device's primary context (the one torch and the
runtime use) pushed, and pops it after, so the calling thread's current device is untouched.

Handles are opened once per process: CUDA refuses to open one handle twice in one context, so
two agents of one process that read the same owner share the mapping (counted references).
"""

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, Final

from shared.kv_transfer.base import TransportUnavailable

LIBRARY: Final = "libcuda.so.1"
IPC_HANDLE_BYTES: Final = 64
_LAZY_ENABLE_PEER_ACCESS: Final = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
_POINTER_DEVICE_ORDINAL: Final = 9  # CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
_SIGNATURES: Final[dict[str, list[Any]]] = {
    # name: argument types; every function returns a CUresult (int, 0 = success)
    "cuInit": [ctypes.c_uint],
    "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetUuid": [ctypes.c_char_p, ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuCtxPushCurrent_v2": [ctypes.c_void_p],
    "cuCtxPopCurrent_v2": [ctypes.POINTER(ctypes.c_void_p)],
    "cuPointerGetAttribute": [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64],
    "cuMemGetAddressRange_v2": [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_uint64,
    ],
    "cuIpcGetMemHandle": [ctypes.c_char_p, ctypes.c_uint64],
    "cuIpcOpenMemHandle_v2": [ctypes.POINTER(ctypes.c_uint64), "handle", ctypes.c_uint],
    "cuIpcCloseMemHandle": [ctypes.c_uint64],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


class CudaError(TransportUnavailable):
    """A driver call failed; ``result`` is its ``CUresult``."""

    def __init__(self, call: str, result: int, name: str) -> None:
        super().__init__(f"CUDA driver call {call} failed: {name} ({result})")
        self.result = result


class _IpcMemHandle(ctypes.Structure):
    """``CUipcMemHandle``, passed by value to ``cuIpcOpenMemHandle``."""

    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class CudaDriver:
    """The driver, initialised. Use ``load_driver()`` for the process's one instance."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)  # AttributeError: a driver too old
            function.argtypes = [_IpcMemHandle if t == "handle" else t for t in argtypes]
            function.restype = ctypes.c_int
        self._check("cuInit", self._lib.cuInit(0))
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.RLock()  # open() holds it while context() takes it
        self._opened: dict[bytes, list[int]] = {}  # handle -> [address, references]

    def _check(self, call: str, code: int) -> None:
        if code != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(code, ctypes.byref(name))
            raise CudaError(call, code, (name.value or b"unknown error").decode())

    @property
    def num_devices(self) -> int:
        count = ctypes.c_int()
        self._check("cuDeviceGetCount", self._lib.cuDeviceGetCount(ctypes.byref(count)))
        return count.value

    def device_uuid(self, index: int) -> str:
        """The GPU's UUID as ``nvidia-smi -L`` spells it (``GPU-xxxxxxxx-xxxx-...``)."""
        raw = ctypes.create_string_buffer(16)
        self._check("cuDeviceGetUuid", self._lib.cuDeviceGetUuid(raw, self._device(index)))
        h = raw.raw.hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _device(self, index: int) -> int:
        device = ctypes.c_int()
        self._check("cuDeviceGet", self._lib.cuDeviceGet(ctypes.byref(device), index))
        return device.value

    @contextmanager
    def context(self, index: int) -> Iterator[None]:
        """Run driver calls in device ``index``'s primary context (retained for good)."""
        with self._lock:
            context = self._contexts.get(index)
            if context is None:
                context = ctypes.c_void_p()
                self._check(
                    "cuDevicePrimaryCtxRetain",
                    self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), self._device(index)),
                )
                self._contexts[index] = context
        self._check("cuCtxPushCurrent", self._lib.cuCtxPushCurrent_v2(context))
        try:
            yield
        finally:
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def allocation_of(self, address: int, index: int) -> tuple[int, int]:
        """``(base, size_bytes)`` of the allocation holding ``address``, which must be memory of
        device ``index``; ``ValueError`` otherwise."""
        with self.context(index):
            ordinal = ctypes.c_int(-1)
            code = self._lib.cuPointerGetAttribute(
                ctypes.byref(ordinal), _POINTER_DEVICE_ORDINAL, address
            )
            if code != 0 or ordinal.value != index:
                raise ValueError(
                    f"address {address:#x} is not memory of cuda:{index} "
                    f"(CUresult {code}, device ordinal {ordinal.value})"
                )
            base, size = ctypes.c_uint64(), ctypes.c_size_t()
            self._check(
                "cuMemGetAddressRange",
                self._lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), address),
            )
        return base.value, size.value

    def export(self, base: int, index: int) -> bytes:
        """The IPC handle of the allocation starting at ``base``."""
        handle = ctypes.create_string_buffer(IPC_HANDLE_BYTES)
        with self.context(index):
            self._check("cuIpcGetMemHandle", self._lib.cuIpcGetMemHandle(handle, base))
        return handle.raw

    def open(self, handle: bytes, index: int) -> int:
        """Map a peer's allocation here (opened in device ``index``'s context, with peer access
        if it lives on another GPU); its base address in this process. Pair with ``close``."""
        if len(handle) != IPC_HANDLE_BYTES:
            raise TransportUnavailable(f"a CUDA IPC handle has 64 bytes, got {len(handle)}")
        with self._lock:
            opened = self._opened.get(handle)
            if opened is not None:
                opened[1] += 1
                return opened[0]
            address = ctypes.c_uint64()
            with self.context(index):
                self._check(
                    "cuIpcOpenMemHandle",
                    self._lib.cuIpcOpenMemHandle_v2(
                        ctypes.byref(address),
                        _IpcMemHandle.from_buffer_copy(handle),
                        _LAZY_ENABLE_PEER_ACCESS,
                    ),
                )
            self._opened[handle] = [address.value, 1]
            return address.value

    def close(self, handle: bytes, index: int) -> None:
        """Drop one reference to a mapping from ``open``; the last one unmaps it."""
        with self._lock:
            opened = self._opened.get(handle)
            if opened is None:
                return
            opened[1] -= 1
            if opened[1] > 0:
                return
            del self._opened[handle]
            with self.context(index):
                self._lib.cuIpcCloseMemHandle(opened[0])


@cache
def load_driver() -> CudaDriver:
    """The CUDA driver, initialised once; ``TransportUnavailable`` saying why when there is none
    (no NVIDIA driver, no GPU, a driver too old)."""
    try:
        library = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        raise TransportUnavailable(
            f"CUDA IPC needs the NVIDIA driver, but {LIBRARY} cannot be loaded: {exc}"
        ) from exc
    try:
        return CudaDriver(library)
    except AttributeError as exc:
        raise TransportUnavailable(f"the CUDA driver is too old for CUDA IPC: {exc}") from exc
