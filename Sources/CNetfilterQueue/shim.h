#ifndef TRELLIS_CNETFILTERQUEUE_SHIM_H
#define TRELLIS_CNETFILTERQUEUE_SHIM_H
#ifdef __linux__
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <linux/netfilter/nfnetlink_queue.h>
#endif
#endif
