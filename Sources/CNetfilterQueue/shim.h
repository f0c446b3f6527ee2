#ifndef TRELLIS_CNETFILTERQUEUE_SHIM_H
#define TRELLIS_CNETFILTERQUEUE_SHIM_H
#ifdef __linux__
#include <stdint.h>
#include <stddef.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <libmnl/libmnl.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

// Thin wrappers over libnetfilter_queue's message helpers (the modern, libmnl-based API), so that
// Swift never walks netlink attribute arrays itself. The Swift type `NetfilterQueueGate` owns the
// socket and calls only these.

/// Binds `queue` on `nl`: copy metadata only (no payload), queue length `maxlen`, and fail-open:
/// when the queue is full the kernel accepts packets instead of dropping them.
static inline int CNetfilterQueue_bind(struct mnl_socket *nl, char *buf, uint32_t queue, uint32_t maxlen) {
    struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, queue);
    nfq_nlmsg_cfg_put_cmd(nlh, AF_INET, NFQNL_CFG_CMD_BIND);
    if (mnl_socket_sendto(nl, nlh, nlh->nlmsg_len) < 0) return -1;
    nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, queue);
    nfq_nlmsg_cfg_put_params(nlh, NFQNL_COPY_META, 0);
    nfq_nlmsg_cfg_put_qmaxlen(nlh, maxlen);
    mnl_attr_put_u32(nlh, NFQA_CFG_FLAGS, htonl(NFQA_CFG_F_FAIL_OPEN));
    mnl_attr_put_u32(nlh, NFQA_CFG_MASK, htonl(NFQA_CFG_F_FAIL_OPEN));
    if (mnl_socket_sendto(nl, nlh, nlh->nlmsg_len) < 0) return -1;
    return 0;
}

/// The packet id of a queued-packet message, or -1 for any other message (acks, errors).
static inline int64_t CNetfilterQueue_packet_id(const struct nlmsghdr *nlh) {
    if ((nlh->nlmsg_type & 0xff) != NFQNL_MSG_PACKET || (nlh->nlmsg_type >> 8) != NFNL_SUBSYS_QUEUE) return -1;
    struct nlattr *attr[NFQA_MAX + 1] = {0};
    if (nfq_nlmsg_parse(nlh, attr) < 0 || attr[NFQA_PACKET_HDR] == NULL) return -1;
    struct nfqnl_msg_packet_hdr *ph = (struct nfqnl_msg_packet_hdr *)mnl_attr_get_payload(attr[NFQA_PACKET_HDR]);
    return (int64_t)ntohl(ph->packet_id);
}

/// One verdict for every queued packet with an id up to `id`: accept, with `mark` when
/// `set_mark` is non-zero.
static inline int CNetfilterQueue_accept_batch(struct mnl_socket *nl, char *buf, uint32_t queue, uint32_t id,
                                               int set_mark, uint32_t mark) {
    struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_VERDICT_BATCH, queue);
    nfq_nlmsg_verdict_put(nlh, (int)id, NF_ACCEPT);
    if (set_mark) nfq_nlmsg_verdict_put_mark(nlh, mark);
    return mnl_socket_sendto(nl, nlh, nlh->nlmsg_len) < 0 ? -1 : 0;
}

static inline int CNetfilterQueue_errno(void) { return errno; }
#endif
#endif
