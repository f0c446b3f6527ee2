#ifndef TRELLIS_CNGHTTP2_SHIM_H
#define TRELLIS_CNGHTTP2_SHIM_H
#ifdef __linux__
#include <nghttp2/nghttp2.h>
#endif
#endif
