/*
 * The shm vchan ring: libxenvchan's semantics over a memfd and two eventfds.
 *
 * Nothing here blocks: the caller (the trio wrapper) waits on the epoll fd
 * that fd_for_select() returns and calls shm_wait() once it is readable.
 *
 * Trust: the peer can write anything into the shared region at any time. So
 * every value this side depends on (ring sizes, its own indexes) is copied
 * into private memory when the vchan is set up, each shared index is loaded
 * exactly once per use, and an index the peer moved out of range marks the
 * vchan broken (it then reads as closed) instead of over- or under-running.
 */
#define _GNU_SOURCE
#include "shm_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(sizeof(struct shm_header) == SHM_HEADER_SIZE, "header layout");
_Static_assert(__atomic_always_lock_free(sizeof(uint32_t), 0), "u32 atomics must be lock-free");
_Static_assert(__atomic_always_lock_free(sizeof(uint8_t), 0), "u8 atomics must be lock-free");

struct shm_vchan {
    struct shm_header *hdr;
    size_t map_len;
    /* The ring this side reads and the one it writes. */
    struct shm_indexes *rd, *wr;
    unsigned char *rd_data, *wr_data;
    uint32_t rd_size, wr_size;
    /* Private copies of the indexes only this side moves. */
    uint32_t rd_cons, wr_prod;
    uint8_t *own_live, *peer_live;
    uint8_t *own_notify;  /* requests the peer made of this side */
    uint8_t *peer_notify; /* requests this side makes of the peer */
    int is_server;
    int own_efd, peer_efd, sock, epfd;
    /* The rendezvous socket hung up (the peer exited or was killed). */
    int peer_gone;
    /* The peer broke the ring's invariants. */
    int broken;
};

/* -- signalling ------------------------------------------------------------------ */

static void kick(struct shm_vchan *v)
{
    uint64_t one = 1;
    /* The only failure on a valid eventfd is EAGAIN for a saturated counter,
     * and then the peer has a wake-up pending anyway. */
    ssize_t ignored = write(v->peer_efd, &one, sizeof one);
    (void)ignored;
}

/* After moving an index: signal the peer only if it asked for `bit`, and
 * consume the request, so a busy stream costs no wake-ups nobody waits for. */
static void signal_if_asked(struct shm_vchan *v, uint8_t bit)
{
    /* The index store must be visible before the request is read; otherwise
     * the peer could arm after we looked and then miss our update. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint8_t prev = __atomic_fetch_and(v->own_notify, (uint8_t)~bit, __ATOMIC_SEQ_CST);
    if (prev & bit)
        kick(v);
}

/* Ask the peer to signal `bit`. The caller re-reads the index afterwards:
 * the peer may have moved it between the caller's first look and the request. */
static void request(struct shm_vchan *v, uint8_t bit)
{
    __atomic_fetch_or(v->peer_notify, bit, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* -- ring state ------------------------------------------------------------------ */

static uint32_t ready_now(struct shm_vchan *v)
{
    if (v->broken)
        return 0;
    /* Acquire: the bytes below prod are written before we copy them out. */
    uint32_t n = __atomic_load_n(&v->rd->prod, __ATOMIC_ACQUIRE) - v->rd_cons;
    if (n > v->rd_size) {
        v->broken = 1;
        return 0;
    }
    return n;
}

static uint32_t space_now(struct shm_vchan *v)
{
    if (v->broken)
        return 0;
    /* Acquire: the peer finished reading the bytes below cons before we overwrite them. */
    uint32_t used = v->wr_prod - __atomic_load_n(&v->wr->cons, __ATOMIC_ACQUIRE);
    if (used > v->wr_size) {
        v->broken = 1;
        return 0;
    }
    return v->wr_size - used;
}

/* The peer's state as libxenvchan's is_open reports it, without a syscall. */
static int peer_state(struct shm_vchan *v)
{
    if (v->peer_gone || v->broken)
        return 0;
    uint8_t live = __atomic_load_n(v->peer_live, __ATOMIC_ACQUIRE);
    if (live == 1)
        return 1;
    if (live == 2 && v->is_server)
        return 2;
    return 0;
}

static void copy_out(struct shm_vchan *v, void *buf, uint32_t n)
{
    uint32_t off = v->rd_cons & (v->rd_size - 1);
    uint32_t first = v->rd_size - off < n ? v->rd_size - off : n;
    /* The peer does not touch these bytes until cons moves past them (a
     * hostile peer can only garble its own data). */
    memcpy(buf, v->rd_data + off, first);
    memcpy((unsigned char *)buf + first, v->rd_data, n - first);
    v->rd_cons += n;
    __atomic_store_n(&v->rd->cons, v->rd_cons, __ATOMIC_RELEASE);
    signal_if_asked(v, SHM_NOTIFY_READ);
}

static void copy_in(struct shm_vchan *v, const void *buf, uint32_t n)
{
    uint32_t off = v->wr_prod & (v->wr_size - 1);
    uint32_t first = v->wr_size - off < n ? v->wr_size - off : n;
    memcpy(v->wr_data + off, buf, first);
    memcpy(v->wr_data, (const unsigned char *)buf + first, n - first);
    v->wr_prod += n;
    /* Release: the bytes are in the ring before the peer can see prod move. */
    __atomic_store_n(&v->wr->prod, v->wr_prod, __ATOMIC_RELEASE);
    signal_if_asked(v, SHM_NOTIFY_WRITE);
}

/* Readable bytes (maybe fewer than `want` while the peer is open), or -1
 * once fewer than `want` are readable and the peer has gone. */
static int64_t readable(struct shm_vchan *v, uint32_t want)
{
    uint32_t avail = ready_now(v);
    if (avail >= want)
        return avail;
    request(v, SHM_NOTIFY_WRITE);
    avail = ready_now(v);
    if (avail >= want || peer_state(v) != 0)
        return avail;
    /* The peer published its last bytes before clearing its live byte (or
     * before it died), so one more look sees all it ever sent. */
    avail = ready_now(v);
    return avail >= want ? (int64_t)avail : -1;
}

static size_t clamp_size(size_t size)
{
    return size > INT_MAX ? INT_MAX : size;
}

/* -- the API ------------------------------------------------------------------- */

int shm_read(struct shm_vchan *v, void *buf, size_t size)
{
    size = clamp_size(size);
    if (size == 0)
        return 0;
    int64_t avail = readable(v, 1);
    if (avail <= 0)
        return (int)avail;
    uint32_t n = (uint64_t)avail < size ? (uint32_t)avail : (uint32_t)size;
    copy_out(v, buf, n);
    return (int)n;
}

int shm_recv(struct shm_vchan *v, void *buf, size_t size)
{
    if (size > v->rd_size) {
        errno = EMSGSIZE; /* could never arrive whole */
        return -1;
    }
    if (size == 0)
        return 0;
    int64_t avail = readable(v, (uint32_t)size);
    if (avail < 0)
        return -1;
    if ((uint64_t)avail < size)
        return 0;
    copy_out(v, buf, (uint32_t)size);
    return (int)size;
}

/* Free space for `want` bytes, or -1 if the peer is gone. */
static int64_t writable(struct shm_vchan *v, uint32_t want)
{
    if (peer_state(v) == 0)
        return -1;
    uint32_t space = space_now(v);
    if (space < want) {
        request(v, SHM_NOTIFY_READ);
        space = space_now(v);
    }
    return v->broken ? -1 : (int64_t)space;
}

int shm_write(struct shm_vchan *v, const void *buf, size_t size)
{
    size = clamp_size(size);
    int64_t space = writable(v, (uint32_t)size);
    if (space < 0)
        return -1;
    if (space == 0 || size == 0)
        return 0;
    uint32_t n = (uint64_t)space < size ? (uint32_t)space : (uint32_t)size;
    copy_in(v, buf, n);
    return (int)n;
}

int shm_send(struct shm_vchan *v, const void *buf, size_t size)
{
    if (size > v->wr_size) {
        errno = EMSGSIZE; /* could never fit whole */
        return -1;
    }
    int64_t space = writable(v, (uint32_t)size);
    if (space < 0)
        return -1;
    if ((uint64_t)space < size || size == 0)
        return 0;
    copy_in(v, buf, (uint32_t)size);
    return (int)size;
}

int shm_data_ready(struct shm_vchan *v)
{
    request(v, SHM_NOTIFY_WRITE);
    return (int)ready_now(v);
}

int shm_buffer_space(struct shm_vchan *v)
{
    request(v, SHM_NOTIFY_READ);
    return (int)space_now(v);
}

/* Look (without waiting) whether the rendezvous socket says the peer is gone. */
static int check_socket(struct shm_vchan *v)
{
    if (v->sock < 0 || v->peer_gone)
        return 0;
    struct pollfd p = {.fd = v->sock, .events = POLLIN | POLLRDHUP, .revents = 0};
    int r = poll(&p, 1, 0);
    if (r < 0)
        return errno == EINTR ? 0 : -1;
    /* A live, well-behaved peer never makes the socket readable: EOF, a
     * hangup, an error or stray bytes all mean it is gone (or misbehaving). */
    if (r > 0)
        v->peer_gone = 1;
    return 0;
}

int shm_wait(struct shm_vchan *v)
{
    uint64_t count;
    /* Non-semaphore eventfd: one read consumes every signal sent so far. */
    if (read(v->own_efd, &count, sizeof count) < 0 && errno != EAGAIN)
        return -1;
    return check_socket(v);
}

int shm_fd_for_select(const struct shm_vchan *v)
{
    return v->epfd;
}

int shm_is_open(struct shm_vchan *v)
{
    if (peer_state(v) != 0 && check_socket(v) < 0)
        return 0;
    return peer_state(v);
}

void shm_close(struct shm_vchan *v)
{
    if (v == NULL)
        return;
    __atomic_store_n(v->own_live, 0, __ATOMIC_RELEASE);
    /* Unconditionally: the peer may be waiting for data, space or the close. */
    kick(v);
    close(v->epfd);
    close(v->own_efd);
    close(v->peer_efd);
    if (v->sock >= 0)
        close(v->sock);
    munmap(v->hdr, v->map_len);
    free(v);
}

/* -- setting up ------------------------------------------------------------------- */

/* Report a setup failure: *why says what, errno says why (0: the input was wrong,
 * not the system), so the caller's message never carries a stale errno. */
static void *fail(const char **why, const char *what, int err)
{
    *why = what;
    errno = err;
    return NULL;
}

size_t shm_region_size(unsigned left_order, unsigned right_order)
{
    if (left_order < SHM_MIN_ORDER || left_order > SHM_MAX_ORDER ||
        right_order < SHM_MIN_ORDER || right_order > SHM_MAX_ORDER)
        return 0;
    return SHM_HEADER_SIZE + ((size_t)1 << left_order) + ((size_t)1 << right_order);
}

static int is_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && (flags & O_NONBLOCK);
}

static void unmap_keeping_errno(void *mem, size_t len)
{
    int err = errno;
    munmap(mem, len);
    errno = err;
}

/* Map `len` bytes of memfd after checking it is a regular file of exactly that size. */
static void *map_region(int memfd, size_t len, const char **why)
{
    struct stat st;
    if (fstat(memfd, &st) < 0)
        return fail(why, "cannot examine the shared memory", errno);
    if (!S_ISREG(st.st_mode))
        return fail(why, "the shared memory is not a regular file", 0);
    if (st.st_size < 0 || (size_t)st.st_size != len)
        return fail(why, "the shared memory has the wrong size", 0);
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED)
        return fail(why, "cannot map the shared memory", errno);
    return mem;
}

/* Allocate the private state and the epoll fd; fds are adopted only on success. */
static struct shm_vchan *new_vchan(struct shm_header *hdr, size_t len, int is_server,
                                   unsigned left_order, unsigned right_order,
                                   int own_efd, int peer_efd, int sock, const char **why)
{
    if (!is_nonblocking(own_efd) || !is_nonblocking(peer_efd))
        return fail(why, "the event fds must be non-blocking", 0);
    struct shm_vchan *v = calloc(1, sizeof *v);
    if (v == NULL)
        return fail(why, "out of memory", ENOMEM);
    v->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data = {.fd = own_efd}};
    if (v->epfd < 0 || epoll_ctl(v->epfd, EPOLL_CTL_ADD, own_efd, &ev) < 0) {
        int err = errno;
        if (v->epfd >= 0)
            close(v->epfd);
        free(v);
        return fail(why, "cannot set up the event channel", err);
    }
    unsigned char *base = (unsigned char *)hdr;
    uint32_t left_size = (uint32_t)1 << left_order;
    uint32_t right_size = (uint32_t)1 << right_order;
    unsigned char *left = base + SHM_HEADER_SIZE;
    unsigned char *right = left + left_size;
    v->hdr = hdr;
    v->map_len = len;
    v->is_server = is_server;
    v->own_efd = own_efd;
    v->peer_efd = peer_efd;
    v->sock = -1;
    if (is_server) {
        v->rd = &hdr->left, v->rd_data = left, v->rd_size = left_size;
        v->wr = &hdr->right, v->wr_data = right, v->wr_size = right_size;
        v->own_live = &hdr->srv_live, v->peer_live = &hdr->cli_live;
        v->own_notify = &hdr->srv_notify, v->peer_notify = &hdr->cli_notify;
    } else {
        v->rd = &hdr->right, v->rd_data = right, v->rd_size = right_size;
        v->wr = &hdr->left, v->wr_data = left, v->wr_size = left_size;
        v->own_live = &hdr->cli_live, v->peer_live = &hdr->srv_live;
        v->own_notify = &hdr->cli_notify, v->peer_notify = &hdr->srv_notify;
    }
    v->rd_cons = __atomic_load_n(&v->rd->cons, __ATOMIC_RELAXED);
    v->wr_prod = __atomic_load_n(&v->wr->prod, __ATOMIC_RELAXED);
    if (sock >= 0 && shm_server_attach(v, sock) < 0) {
        int err = errno;
        close(v->epfd);
        free(v);
        return fail(why, "cannot watch the rendezvous connection", err);
    }
    return v;
}

struct shm_vchan *shm_server_new(int memfd, int own_efd, int peer_efd,
                                 unsigned read_order, unsigned write_order,
                                 const char **why)
{
    size_t len = shm_region_size(read_order, write_order);
    if (len == 0)
        return fail(why, "ring order out of range", 0);
    struct shm_header *hdr = map_region(memfd, len, why);
    if (hdr == NULL)
        return NULL;
    memset(hdr, 0, SHM_HEADER_SIZE);
    hdr->magic = SHM_MAGIC;
    hdr->version = SHM_VERSION;
    hdr->left_order = (uint16_t)read_order;
    hdr->right_order = (uint16_t)write_order;
    hdr->srv_live = 1;
    hdr->cli_live = 2;
    /* The server's first wait is for the client's arrival, which the client
     * signals unconditionally; ask for its first write too, as libxenvchan does. */
    hdr->cli_notify = SHM_NOTIFY_WRITE;
    struct shm_vchan *v =
        new_vchan(hdr, len, 1, read_order, write_order, own_efd, peer_efd, -1, why);
    if (v == NULL)
        unmap_keeping_errno(hdr, len);
    return v;
}

int shm_server_attach(struct shm_vchan *v, int sock)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data = {.fd = sock}};
    if (v->sock >= 0 || epoll_ctl(v->epfd, EPOLL_CTL_ADD, sock, &ev) < 0)
        return -1;
    v->sock = sock;
    return 0;
}

struct shm_vchan *shm_client_new(int memfd, int own_efd, int peer_efd, int sock,
                                 const char **why)
{
    struct stat st;
    if (fstat(memfd, &st) < 0)
        return fail(why, "cannot examine the shared memory", errno);
    if (st.st_size < (off_t)shm_region_size(SHM_MIN_ORDER, SHM_MIN_ORDER) ||
        st.st_size > (off_t)shm_region_size(SHM_MAX_ORDER, SHM_MAX_ORDER))
        return fail(why, "the shared memory has an impossible size", 0);
    size_t len = (size_t)st.st_size;
    struct shm_header *hdr = map_region(memfd, len, why);
    if (hdr == NULL)
        return NULL;
    /* Read each field once; the values checked are the values used. */
    uint32_t magic = __atomic_load_n(&hdr->magic, __ATOMIC_RELAXED);
    uint32_t version = __atomic_load_n(&hdr->version, __ATOMIC_RELAXED);
    uint16_t lo = __atomic_load_n(&hdr->left_order, __ATOMIC_RELAXED);
    uint16_t ro = __atomic_load_n(&hdr->right_order, __ATOMIC_RELAXED);
    struct shm_vchan *v = NULL;
    if (magic != SHM_MAGIC || version != SHM_VERSION) {
        fail(why, "bad magic or version in the shared memory", 0);
    } else if (shm_region_size(lo, ro) != len) {
        fail(why, "ring orders in the shared memory do not match its size", 0);
    } else {
        /* From here on the sizes are private: a peer rewriting the orders changes nothing. */
        v = new_vchan(hdr, len, 0, lo, ro, own_efd, peer_efd, sock, why);
    }
    if (v == NULL) {
        unmap_keeping_errno(hdr, len);
        return NULL;
    }
    if (__atomic_load_n(&v->rd->prod, __ATOMIC_ACQUIRE) - v->rd_cons > v->rd_size ||
        v->wr_prod - __atomic_load_n(&v->wr->cons, __ATOMIC_ACQUIRE) > v->wr_size) {
        fail(why, "the rings in the shared memory are inconsistent", 0);
        goto refuse;
    }
    uint8_t waiting = 2;
    if (__atomic_load_n(&hdr->srv_live, __ATOMIC_ACQUIRE) != 1 ||
        !__atomic_compare_exchange_n(&hdr->cli_live, &waiting, 1, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        fail(why, "the server is not waiting for a client", 0);
        goto refuse;
    }
    __atomic_fetch_or(&hdr->srv_notify, SHM_NOTIFY_WRITE, __ATOMIC_SEQ_CST);
    kick(v); /* the server is waiting for cli_live to leave 2 */
    return v;

refuse:
    /* Hand the fds back to the caller: close only what new_vchan made. */
    close(v->epfd);
    munmap(hdr, len);
    free(v);
    errno = 0; /* the failures that lead here are all in the input */
    return NULL;
}

struct shm_header *shm_header_of(struct shm_vchan *v)
{
    return v->hdr;
}

void shm_test_set_indexes(struct shm_vchan *v, uint32_t value)
{
    v->hdr->left.cons = v->hdr->left.prod = value;
    v->hdr->right.cons = v->hdr->right.prod = value;
    v->rd_cons = v->wr_prod = value;
}
