#ifndef TRELLIS_CMNL_SHIM_H
#define TRELLIS_CMNL_SHIM_H
#ifdef __linux__
#include <stddef.h>
#include <libmnl/libmnl.h>

/// `MNL_SOCKET_BUFFER_SIZE` is a macro Swift cannot import.
static inline size_t CMnl_socket_buffer_size(void) { return (size_t)MNL_SOCKET_BUFFER_SIZE; }
#endif
#endif
