#ifndef TRELLIS_CMALLOC_SHIM_H
#define TRELLIS_CMALLOC_SHIM_H
#ifdef __linux__
/// glibc's allocator statistics and `malloc_trim`, which Swift's Glibc module does not import.
#include <malloc.h>
#endif
#endif
