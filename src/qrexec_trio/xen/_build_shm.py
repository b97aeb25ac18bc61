"""cffi build script for the shm vchan ring (API mode, compiled at install time).

setup.py names ``ffi`` here in ``cffi_modules``; the result is the extension
module ``qrexec_trio.xen._shm_cffi``. For quick iteration run this file from
``src/`` (``python qrexec_trio/xen/_build_shm.py``): it builds in place.
"""

from __future__ import annotations

import os

from cffi import FFI  # type: ignore[import-untyped, unused-ignore]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(name: str) -> str:
    # setuptools wants source paths relative to the directory it runs in.
    return os.path.relpath(os.path.join(_HERE, name))


ffi = FFI()

ffi.cdef(
    """
    #define SHM_MAGIC ...
    #define SHM_VERSION ...
    #define SHM_HEADER_SIZE ...
    #define SHM_MIN_ORDER ...
    #define SHM_MAX_ORDER ...
    #define SHM_NOTIFY_WRITE ...
    #define SHM_NOTIFY_READ ...

    struct shm_indexes { uint32_t cons; uint32_t prod; };
    struct shm_header {
        uint32_t magic;
        uint32_t version;
        struct shm_indexes left;
        struct shm_indexes right;
        uint16_t left_order;
        uint16_t right_order;
        uint8_t cli_live;
        uint8_t srv_live;
        uint8_t cli_notify;
        uint8_t srv_notify;
        uint8_t reserved[32];
    };
    struct shm_vchan;

    size_t shm_region_size(unsigned left_order, unsigned right_order);
    struct shm_vchan *shm_server_new(int memfd, int own_efd, int peer_efd,
                                     unsigned read_order, unsigned write_order,
                                     const char **why);
    int shm_server_attach(struct shm_vchan *v, int sock);
    struct shm_vchan *shm_client_new(int memfd, int own_efd, int peer_efd, int sock,
                                     const char **why);

    int shm_read(struct shm_vchan *v, void *buf, size_t size);
    int shm_write(struct shm_vchan *v, const void *buf, size_t size);
    int shm_recv(struct shm_vchan *v, void *buf, size_t size);
    int shm_send(struct shm_vchan *v, const void *buf, size_t size);
    int shm_data_ready(struct shm_vchan *v);
    int shm_buffer_space(struct shm_vchan *v);
    int shm_wait(struct shm_vchan *v);
    int shm_fd_for_select(const struct shm_vchan *v);
    int shm_is_open(struct shm_vchan *v);
    void shm_close(struct shm_vchan *v);

    struct shm_header *shm_header_of(struct shm_vchan *v);
    void shm_test_set_indexes(struct shm_vchan *v, uint32_t value);
    """
)

ffi.set_source(
    "qrexec_trio.xen._shm_cffi",
    '#include "shm_ring.h"',
    sources=[_rel("shm_ring.c")],
    depends=[_rel("shm_ring.h")],  # also puts the header into the sdist
    include_dirs=[_rel(".")],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    built = ffi.compile(verbose=True)
    # Leave only the extension module in the tree, not cffi's intermediates.
    for leftover in ("_shm_cffi.c", "_shm_cffi.o", "shm_ring.o"):
        path = os.path.join(os.path.dirname(built), leftover)
        if os.path.exists(path):
            os.unlink(path)
