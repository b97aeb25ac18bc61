/*
 * A vchan in a shared-memory region: two byte rings plus a small header, with
 * libxenvchan's semantics, driven without ever blocking.
 *
 * Region layout (all integers in the machine's byte order; both ends run on
 * one host):
 *
 *   offset  size  field
 *        0     4  magic        SHM_MAGIC
 *        4     4  version      SHM_VERSION
 *        8     8  left         {cons, prod}: client writes, server reads
 *       16     8  right        {cons, prod}: server writes, client reads
 *       24     2  left_order   log2 of the left ring's size (10..20)
 *       26     2  right_order  log2 of the right ring's size (10..20)
 *       28     1  cli_live     0 gone, 1 connected, 2 server waiting for it
 *       29     1  srv_live     0 gone, 1 connected
 *       30     1  cli_notify   events the server asked the client to signal
 *       31     1  srv_notify   events the client asked the server to signal
 *       32    32  reserved     zero
 *       64        the left ring, then the right ring
 *
 * The indexes are free-running u32s, masked by the ring size on use.
 */
#ifndef QREXEC_TRIO_SHM_RING_H
#define QREXEC_TRIO_SHM_RING_H

#include <stddef.h>
#include <stdint.h>

#define SHM_MAGIC 0x4d485351u /* "QSHM" read as little-endian bytes */
#define SHM_VERSION 1
#define SHM_HEADER_SIZE 64
#define SHM_MIN_ORDER 10
#define SHM_MAX_ORDER 20

/* Bits of a notify byte: "signal me when you have written / read". */
#define SHM_NOTIFY_WRITE 1
#define SHM_NOTIFY_READ 2

struct shm_indexes {
    uint32_t cons;
    uint32_t prod;
};

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

/* Bytes a region with these ring orders occupies (0 if an order is out of range). */
size_t shm_region_size(unsigned left_order, unsigned right_order);

/*
 * Server side. memfd must already have exactly shm_region_size() bytes; it is
 * mapped, not kept. own_efd/peer_efd must be non-blocking eventfds; on success
 * the vchan owns them. read_order is the left ring, write_order the right one.
 * Returns NULL with *why set (a static string) on failure.
 */
struct shm_vchan *shm_server_new(int memfd, int own_efd, int peer_efd,
                                 unsigned read_order, unsigned write_order,
                                 const char **why);
/* Server side: the rendezvous connection to the client (the vchan owns it on success). */
int shm_server_attach(struct shm_vchan *v, int sock);

/*
 * Client side: map and check what the server sent, then mark the client live
 * and signal the server. On success the vchan owns own_efd, peer_efd and sock
 * (not memfd). Returns NULL with *why set on failure, owning nothing.
 */
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

/* For tests: the shared header, and moving every index to `value` (empty rings only). */
struct shm_header *shm_header_of(struct shm_vchan *v);
void shm_test_set_indexes(struct shm_vchan *v, uint32_t value);

#endif
