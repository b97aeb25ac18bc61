"""cffi build script (API mode) for the Xen vchan backend: ``qrexec_trio.xen._xen_cffi``.

setup.py builds it only where ``/usr/include/libxenvchan.h`` exists (Debian:
``libxen-dev``). The extension is linked against the libxenvchan of the
machine it is built on, whose SONAME carries the Xen version, so it must be
built on the target, never shipped prebuilt.

Besides libxenvchan's 12 functions it carries a small C shim that adds what
the Qubes ``libvchan_*`` wrapper adds on top of libxenvchan (and Debian does
not package): the port naming in xenstore, non-blocking mode, errno on
failure, the own domain id, and withdrawing an offer once its client came.

The cdef below is checked against the real header when the extension is
compiled: every declared function gets a ``_Static_assert`` that its type is
the one the header (or the shim) gives it, and the structs are declared with
``...;`` so cffi takes their layout from the compiler and checks the field
types. A declaration that drifts from the header fails the build.

This file is executed by cffi's setuptools hook, not imported: it must not
import from the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import cffi  # type: ignore[import-untyped]

MODULE_NAME = "qrexec_trio.xen._xen_cffi"

#: (return type, name, parameters) of libxenvchan's API, as in libxenvchan.h.
LIBXENVCHAN_FUNCTIONS: tuple[tuple[str, str, str], ...] = (
    ("struct libxenvchan *", "libxenvchan_server_init",
     "struct xentoollog_logger *logger, int domain, const char *xs_path, "
     "size_t read_min, size_t write_min"),
    ("struct libxenvchan *", "libxenvchan_client_init",
     "struct xentoollog_logger *logger, int domain, const char *xs_path"),
    ("void", "libxenvchan_close", "struct libxenvchan *ctrl"),
    ("int", "libxenvchan_recv", "struct libxenvchan *ctrl, void *data, size_t size"),
    ("int", "libxenvchan_read", "struct libxenvchan *ctrl, void *data, size_t size"),
    ("int", "libxenvchan_send", "struct libxenvchan *ctrl, const void *data, size_t size"),
    ("int", "libxenvchan_write", "struct libxenvchan *ctrl, const void *data, size_t size"),
    ("int", "libxenvchan_wait", "struct libxenvchan *ctrl"),
    ("int", "libxenvchan_fd_for_select", "struct libxenvchan *ctrl"),
    ("int", "libxenvchan_is_open", "struct libxenvchan *ctrl"),
    ("int", "libxenvchan_data_ready", "struct libxenvchan *ctrl"),
    ("int", "libxenvchan_buffer_space", "struct libxenvchan *ctrl"),
)

#: The shim's functions (defined in SHIM_SOURCE below).
SHIM_FUNCTIONS: tuple[tuple[str, str, str], ...] = (
    ("int", "qt_format_path",
     "char *buf, size_t len, int server_domain, int client_domain, int port, int absolute"),
    ("int", "qt_server_open",
     "int peer, int port, size_t read_min, size_t write_min, struct libxenvchan **out"),
    ("int", "qt_client_open",
     "int peer, int own, int port, struct libxenvchan **out, int *stage"),
    ("int", "qt_server_withdraw", "struct libxenvchan *ctrl"),
    ("int", "qt_own_domid", "int *out"),
    ("int", "qt_xs_exists", "const char *path, int *exists"),
    ("int", "qt_wait", "struct libxenvchan *ctrl"),
    ("void", "qt_set_blocking", "struct libxenvchan *ctrl, int on"),
    ("int", "qt_get_blocking", "const struct libxenvchan *ctrl"),
    ("int", "qt_primer_works", "void"),
)

TYPES_CDEF = """
struct xentoollog_logger;
struct libxenvchan { ...; };

struct ring_shared {
    uint32_t cons, prod;
};

struct vchan_interface {
    struct ring_shared left, right;
    uint16_t left_order, right_order;
    uint8_t cli_live, srv_live;
    uint8_t cli_notify, srv_notify;
    ...;
};

#define VCHAN_NOTIFY_WRITE ...
#define VCHAN_NOTIFY_READ ...

/* qt_client_open's *stage: how far it got before failing. */
#define QT_STAGE_XENSTORE ...
#define QT_STAGE_OFFER ...
#define QT_STAGE_INIT ...
#define QT_PATH_MAX ...
"""

SHIM_SOURCE = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xenstore.h>

/* Every path this shim builds fits here; libxenvchan itself appends
 * "/event-channel" into a 64-byte buffer, so the limit is the library's. */
#define QT_PATH_MAX 48

#define QT_STAGE_XENSTORE 1 /* xenstore could not be opened (no Xen?) */
#define QT_STAGE_OFFER 2    /* the server's entry is not (yet) there */
#define QT_STAGE_INIT 3     /* libxenvchan_client_init itself failed */

/* A failing libc/libxen call that left errno at 0 still has to report
 * something non-zero to Python. */
static int qt_errno(void)
{
    return errno ? errno : EIO;
}

/* The Qubes port convention. The server (domain S) offers port P to client
 * domain C under its own xenstore tree, data/vchan/<C>/<P>: written as a
 * *relative* path, which xenstore resolves to /local/domain/<S>/data/vchan/<C>/<P>.
 * The client names the same node absolutely. Returns 0, or ENAMETOOLONG. */
static int qt_format_path(char *buf, size_t len, int server_domain,
                          int client_domain, int port, int absolute)
{
    int n;

    if (absolute)
        n = snprintf(buf, len, "/local/domain/%d/data/vchan/%d/%d",
                     server_domain, client_domain, port);
    else
        n = snprintf(buf, len, "data/vchan/%d/%d", client_domain, port);
    return (n < 0 || (size_t)n >= len) ? ENAMETOOLONG : 0;
}

/* blocking is a signed 1-bit bitfield (it reads back as -1 when set), so it
 * is never declared to cffi: these two are the only way Python touches it. */
static void qt_set_blocking(struct libxenvchan *ctrl, int on)
{
    ctrl->blocking = on ? 1 : 0;
}

static int qt_get_blocking(const struct libxenvchan *ctrl)
{
    return ctrl->blocking ? 1 : 0;
}

/* libxenvchan 4.17's server_init mallocs its control block without clearing
 * it, and its early error paths (a grant or event channel that cannot be
 * had) then hand uninitialised fields (xs_path, the ring buffers) to free()
 * and munmap(). glibc's per-thread cache of small blocks is LIFO, so taking a
 * block of that size, zeroing it and giving it back just before makes
 * server_init get exactly that block, with those fields NULL. (Not calloc:
 * glibc's calloc bypasses that cache, and its block could land elsewhere.)
 * Best effort: with another allocator this does nothing, and does no harm. */
static void qt_prime_allocator(void)
{
    void *block = malloc(sizeof(struct libxenvchan));

    if (!block)
        return;
    /* Empty asms hide the block from the optimiser: otherwise GCC turns
     * malloc+memset into calloc, or deletes the pair as dead code. */
    __asm__ __volatile__("" : "+r"(block));
    memset(block, 0, sizeof(struct libxenvchan));
    __asm__ __volatile__("" : : "r"(block) : "memory");
    free(block);
}

/* For the tests: leave a dirty block of that size in the allocator's cache,
 * prime, and see whether the next allocation (server_init's) reads clear. */
static int qt_primer_works(void)
{
    struct libxenvchan *p = malloc(sizeof *p);
    int clear;

    if (!p)
        return 0;
    memset(p, 0xa5, sizeof *p);
    __asm__ __volatile__("" : : "r"(p) : "memory");
    free(p);
    qt_prime_allocator();
    p = malloc(sizeof *p);
    if (!p)
        return 0;
    __asm__ __volatile__("" : : "r"(p) : "memory");
    clear = !p->xs_path && !p->read.buffer && !p->write.buffer;
    free(p);
    return clear;
}

static int qt_server_open(int peer, int port, size_t read_min, size_t write_min,
                          struct libxenvchan **out)
{
    char path[QT_PATH_MAX];
    struct libxenvchan *ctrl;
    int err = qt_format_path(path, sizeof path, 0, peer, port, 0);

    if (err)
        return err;
    qt_prime_allocator();
    errno = 0;
    ctrl = libxenvchan_server_init(NULL, peer, path, read_min, write_min);
    if (!ctrl)
        return qt_errno();
    qt_set_blocking(ctrl, 0); /* trio does the waiting, on fd_for_select */
    *out = ctrl;
    return 0;
}

/* One attempt: look for the server's offer first (so "not offered yet" is
 * told apart from "no Xen" and from a real failure), then connect. */
static int qt_client_open(int peer, int own, int port, struct libxenvchan **out,
                          int *stage)
{
    char path[QT_PATH_MAX], key[QT_PATH_MAX + 16];
    struct xs_handle *xs;
    struct libxenvchan *ctrl;
    unsigned int len;
    void *value;
    int err;

    *stage = QT_STAGE_OFFER;
    err = qt_format_path(path, sizeof path, peer, own, port, 1);
    if (err)
        return err;
    snprintf(key, sizeof key, "%s/event-channel", path);

    *stage = QT_STAGE_XENSTORE;
    errno = 0;
    xs = xs_open(0);
    if (!xs)
        return qt_errno();
    *stage = QT_STAGE_OFFER;
    errno = 0;
    value = xs_read(xs, XBT_NULL, key, &len);
    err = value ? 0 : qt_errno();
    free(value);
    xs_close(xs);
    if (err)
        return err;

    *stage = QT_STAGE_INIT;
    errno = 0;
    ctrl = libxenvchan_client_init(NULL, peer, path);
    if (!ctrl)
        return qt_errno();
    qt_set_blocking(ctrl, 0);
    *out = ctrl;
    return 0;
}

/* Once the client is in, remove the offer (and data/vchan/<peer> if that is
 * now empty) so that no second client can find it; one transaction, retried
 * on conflict. On success libxenvchan_close no longer removes anything, so a
 * later offer on the same port is never deleted by this one's close. */
static int qt_server_withdraw(struct libxenvchan *ctrl)
{
    char parent[QT_PATH_MAX];
    char **entries;
    char *slash;
    struct xs_handle *xs;
    xs_transaction_t t;
    unsigned int n;
    int tries, err = EAGAIN;

    if (!ctrl->xs_path)
        return 0;
    if (snprintf(parent, sizeof parent, "%s", ctrl->xs_path) >= (int)sizeof parent)
        return ENAMETOOLONG;
    slash = strrchr(parent, '/');
    if (slash)
        *slash = '\0';

    errno = 0;
    xs = xs_open(0);
    if (!xs)
        return qt_errno();
    for (tries = 0; tries < 5 && err == EAGAIN; tries++) {
        errno = 0;
        t = xs_transaction_start(xs);
        if (t == XBT_NULL) {
            /* No transaction to be had (the per-domain quota, say): remove
             * the port entry alone, without a transaction. */
            errno = 0;
            err = (xs_rm(xs, XBT_NULL, ctrl->xs_path) || errno == ENOENT) ? 0 : qt_errno();
            break;
        }
        err = 0;
        if (!xs_rm(xs, t, ctrl->xs_path) && errno != ENOENT)
            err = qt_errno();
        if (!err && slash) {
            entries = xs_directory(xs, t, parent, &n);
            if (entries && n == 0)
                xs_rm(xs, t, parent);
            free(entries);
        }
        errno = 0;
        if (!xs_transaction_end(xs, t, err != 0) && !err)
            err = qt_errno(); /* EAGAIN: someone else wrote there, retry */
    }
    xs_close(xs);
    if (!err) {
        free(ctrl->xs_path);
        ctrl->xs_path = NULL;
    }
    return err;
}

/* This domain's id, from the relative xenstore key "domid". */
static int qt_own_domid(int *out)
{
    struct xs_handle *xs;
    unsigned int len;
    char *value, *end;
    long id;
    int err = 0;

    errno = 0;
    xs = xs_open(0);
    if (!xs)
        return qt_errno();
    errno = 0;
    value = xs_read(xs, XBT_NULL, "domid", &len);
    if (!value) {
        err = qt_errno();
    } else {
        id = strtol(value, &end, 10);
        if (end == value || *end != '\0' || id < 0 || id > 0x7fef)
            err = EINVAL;
        else
            *out = (int)id;
    }
    free(value);
    xs_close(xs);
    return err;
}

/* Whether a xenstore node exists (for tests and diagnostics). */
static int qt_xs_exists(const char *path, int *exists)
{
    struct xs_handle *xs;
    unsigned int len;
    void *value;
    int err = 0;

    errno = 0;
    xs = xs_open(0);
    if (!xs)
        return qt_errno();
    errno = 0;
    value = xs_read(xs, XBT_NULL, path, &len);
    *exists = value != NULL;
    if (!value && errno != ENOENT)
        err = qt_errno();
    free(value);
    xs_close(xs);
    return err;
}

/* Consume one event. Only ever called after fd_for_select was readable:
 * otherwise the read() inside would block the whole trio loop. */
static int qt_wait(struct libxenvchan *ctrl)
{
    errno = 0;
    return libxenvchan_wait(ctrl) ? qt_errno() : 0;
}
"""


def _declarations(functions: Sequence[tuple[str, str, str]]) -> str:
    return "".join(f"{ret} {name}({params});\n" for ret, name, params in functions)


def _signature_checks(functions: Sequence[tuple[str, str, str]]) -> str:
    """One compile-time assertion per function: its cdef type is the real one."""
    return "".join(
        f"_Static_assert(__builtin_types_compatible_p(__typeof__(&{name}), "
        f"{ret} (*)({params})), \"cdef of {name} does not match its C declaration\");\n"
        for ret, name, params in functions
    )


def make_ffi(
    extra_compile_args: Sequence[str] = (),
    functions: Sequence[tuple[str, str, str]] = LIBXENVCHAN_FUNCTIONS + SHIM_FUNCTIONS,
) -> cffi.FFI:
    """The FFI for the extension (tests rebuild it with ``-Werror``, or with a
    deliberately wrong declaration to see the build refuse it)."""
    builder = cffi.FFI()
    builder.cdef(TYPES_CDEF + _declarations(functions))
    builder.set_source(
        MODULE_NAME,
        "#include <libxenvchan.h>\n" + SHIM_SOURCE + _signature_checks(functions),
        # xenstore: the shim reads and removes the Qubes-convention entries itself.
        libraries=["xenvchan", "xenstore"],
        extra_compile_args=["-Wall", "-Wextra", *extra_compile_args],
    )
    return builder


ffi = make_ffi()

if __name__ == "__main__":
    # Build in place for a development checkout: python src/qrexec_trio/xen/_build_xen.py
    import glob
    import os
    import shutil
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        built = ffi.compile(tmpdir=tmp, verbose=True)
        for old in glob.glob(os.path.join(here, "_xen_cffi.*.so")):
            os.unlink(old)
        shutil.copy2(built, here)
