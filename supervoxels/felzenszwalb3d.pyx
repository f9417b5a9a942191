# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Graph-based segmentation (Felzenszwalb & Huttenlocher, IJCV 2004) of a 3D volume: the hot loops.

The Python face is :func:`fsmis_monai.pseudolabels.felzenszwalb_3d`; it validates the input, smooths it
and computes the per-direction weights. This module only does what must be fast, without the GIL:

1. ``_build_edges``: one pass over the volume writes every edge of the 26-neighbourhood (13 directions,
   each voxel pair once) as one 64-bit word ``float32 cost bits << 32 | edge id``, with
   ``edge id = voxel * 13 + direction``. Edges are written in increasing id order.
2. ``_radix_sort``: a stable least-significant-digit radix sort of those words on the 32 cost bits
   (3 passes of 11 bits). Non-negative IEEE-754 floats order like their bit patterns, so this is an
   exact stable sort by cost: ties keep the id order, which makes the output identical on every machine.
3. ``_merge``: greedy union-find in that order with the criterion
   ``cost < min(Int(C1) + k/|C1|, Int(C2) + k/|C2|)`` (Int = cost of the last edge merged into C),
   then a second pass over the same order merging any pair where one side is smaller than ``min_size``.
4. Components are numbered 0..n-1 in the order of their first voxel in C order.

Memory per edge is 8 bytes (+8 for the radix buffer): no per-direction temporaries.
"""

import numpy as np

cimport numpy as cnp
from libc.math cimport fabs
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cnp.import_array()

# (dz, dy, dx) of the 13 directions: one per unordered pair of 26-neighbours, lexicographically positive.
OFFSETS = (
    (0, 0, 1), (0, 1, -1), (0, 1, 0), (0, 1, 1),
    (1, -1, -1), (1, -1, 0), (1, -1, 1), (1, 0, -1), (1, 0, 0), (1, 0, 1), (1, 1, -1), (1, 1, 0), (1, 1, 1),
)
NUM_DIRECTIONS = 13
MAX_VOXELS = (2 ** 31 - 1) // 13  # edge ids are int32: voxel * 13 + direction

DEF NDIR = 13
DEF RADIX_BITS = 11
DEF RADIX_SIZE = 2048
DEF RADIX_MASK = 2047


cdef inline uint32_t _float_bits(float f) noexcept nogil:
    cdef uint32_t u
    memcpy(&u, &f, 4)
    return u


cdef inline float _bits_float(uint32_t u) noexcept nogil:
    cdef float f
    memcpy(&f, &u, 4)
    return f


cdef inline int32_t _find(int32_t* parent, int32_t x) noexcept nogil:
    """Root of ``x`` with path halving."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


cdef int64_t _build_edges(const double* vol, Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx,
                          const double* sqrt_w, const int* dz, const int* dy, const int* dx,
                          uint64_t* out, int64_t* hist) noexcept nogil:
    """Write all edges in id order and the 3 radix histograms; return the number written."""
    cdef Py_ssize_t z, y, x, p, q, zz, yy, xx
    cdef int d
    cdef int64_t i = 0
    cdef Py_ssize_t lin[NDIR]
    cdef double v
    cdef float c
    cdef uint32_t bits
    for d in range(NDIR):
        lin[d] = (dz[d] * ny + dy[d]) * nx + dx[d]
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                p = (z * ny + y) * nx + x
                v = vol[p]
                for d in range(NDIR):
                    zz = z + dz[d]
                    yy = y + dy[d]
                    xx = x + dx[d]
                    if zz >= nz or yy < 0 or yy >= ny or xx < 0 or xx >= nx:
                        continue
                    q = p + lin[d]
                    c = <float>(sqrt_w[d] * fabs(v - vol[q]))
                    bits = _float_bits(c)
                    out[i] = ((<uint64_t>bits) << 32) | <uint64_t>(p * NDIR + d)
                    hist[bits & RADIX_MASK] += 1
                    hist[RADIX_SIZE + ((bits >> RADIX_BITS) & RADIX_MASK)] += 1
                    hist[2 * RADIX_SIZE + (bits >> (2 * RADIX_BITS))] += 1
                    i += 1
    return i


cdef uint64_t* _radix_sort(uint64_t* a, uint64_t* b, int64_t m, int64_t* hist) noexcept nogil:
    """Stable LSD radix sort of ``a`` by its upper 32 bits; returns the buffer holding the result."""
    cdef int pss, shift
    cdef int64_t i, total, cnt
    cdef int64_t* h
    cdef uint64_t* src = a
    cdef uint64_t* dst = b
    cdef uint64_t* t
    cdef uint64_t w
    cdef int64_t first_digit
    for pss in range(3):
        shift = 32 + RADIX_BITS * pss
        h = hist + RADIX_SIZE * pss
        if m == 0:
            break
        first_digit = <int64_t>((src[0] >> shift) & RADIX_MASK)
        if h[first_digit] == m:  # every key has this digit: the pass would not move anything
            continue
        total = 0
        for i in range(RADIX_SIZE):  # counts -> start offsets
            cnt = h[i]
            h[i] = total
            total += cnt
        for i in range(m):
            w = src[i]
            dst[h[(w >> shift) & RADIX_MASK]] = w
            h[(w >> shift) & RADIX_MASK] += 1
        t = src
        src = dst
        dst = t
    return src


cdef int64_t _merge(const uint64_t* edges, int64_t m, Py_ssize_t n, const Py_ssize_t* lin,
                    double k, int64_t min_size, int32_t* parent, int32_t* size, float* cint) noexcept nogil:
    """Both greedy passes over the sorted edges; returns the number of components."""
    cdef int64_t e, nsmall, ncomp = n
    cdef uint64_t w
    cdef uint32_t eid
    cdef Py_ssize_t p, q
    cdef int32_t ra, rb, t
    cdef double cost, ta, tb
    for p in range(n):
        parent[p] = <int32_t>p
        size[p] = 1
        cint[p] = 0.0
    # pass 1: merge when the edge is not heavier than both components' internal variation + k/|C|
    for e in range(m):
        w = edges[e]
        eid = <uint32_t>w  # low 32 bits: the edge id
        p = eid // NDIR
        q = p + lin[eid - p * NDIR]
        ra = _find(parent, <int32_t>p)
        rb = _find(parent, <int32_t>q)
        if ra == rb:
            continue
        cost = _bits_float(<uint32_t>(w >> 32))
        ta = cint[ra] + k / size[ra]
        tb = cint[rb] + k / size[rb]
        if cost < (ta if ta < tb else tb):
            if size[ra] < size[rb]:
                t = ra
                ra = rb
                rb = t
            parent[rb] = ra
            size[ra] += size[rb]
            cint[ra] = <float>cost
            ncomp -= 1
    # pass 2: absorb components smaller than min_size, in the same edge order
    nsmall = 0
    for p in range(n):
        if parent[p] == p and size[p] < min_size:
            nsmall += 1
    e = 0
    while nsmall > 0 and e < m:
        w = edges[e]
        e += 1
        eid = <uint32_t>w  # low 32 bits: the edge id
        p = eid // NDIR
        q = p + lin[eid - p * NDIR]
        ra = _find(parent, <int32_t>p)
        rb = _find(parent, <int32_t>q)
        if ra == rb or (size[ra] >= min_size and size[rb] >= min_size):
            continue
        nsmall -= (size[ra] < min_size) + (size[rb] < min_size)
        if size[ra] < size[rb]:
            t = ra
            ra = rb
            rb = t
        parent[rb] = ra
        size[ra] += size[rb]
        nsmall += size[ra] < min_size
        ncomp -= 1
    return ncomp


cdef void _number_components(Py_ssize_t n, int32_t* parent, int32_t* scratch, int32_t* out) noexcept nogil:
    """``out[p]`` = rank of p's component by its first voxel; ``scratch`` maps roots to ranks."""
    cdef Py_ssize_t p
    cdef int32_t r, nxt = 0
    for p in range(n):
        scratch[p] = -1
    for p in range(n):
        r = _find(parent, <int32_t>p)
        if scratch[r] < 0:
            scratch[r] = nxt
            nxt += 1
        out[p] = scratch[r]


cdef _merge_into(const uint64_t* edges, int64_t m, Py_ssize_t n, const Py_ssize_t* lin, double k,
                 Py_ssize_t min_size, cnp.ndarray labels):
    """Allocate the union-find arrays, run both passes without the GIL, write ranks into ``labels``."""
    cdef cnp.ndarray parent = np.empty(n, dtype=np.int32)
    cdef cnp.ndarray size = np.empty(n, dtype=np.int32)
    cdef cnp.ndarray cint = np.empty(n, dtype=np.float32)
    cdef int32_t* pp = <int32_t*>cnp.PyArray_DATA(parent)
    cdef int32_t* ps = <int32_t*>cnp.PyArray_DATA(size)
    cdef float* pc = <float*>cnp.PyArray_DATA(cint)
    cdef int32_t* po = <int32_t*>cnp.PyArray_DATA(labels)
    with nogil:
        _merge(edges, m, n, lin, k, min_size, pp, ps, pc)
        _number_components(n, pp, ps, po)


def segment(const double[:, :, ::1] volume, const double[::1] sqrt_weights, double k, Py_ssize_t min_size):
    """Felzenszwalb segmentation of a C-contiguous float64 volume; returns int32 labels 0..n-1.

    ``sqrt_weights[d]`` multiplies ``|I(p) - I(p + OFFSETS[d])|``; ``k`` is the merge scale (already
    divided by 255). Validation is the caller's job (see ``fsmis_monai.pseudolabels``).
    """
    cdef Py_ssize_t nz = volume.shape[0], ny = volume.shape[1], nx = volume.shape[2]
    cdef Py_ssize_t n = nz * ny * nx
    cdef int d
    cdef int dz[NDIR]
    cdef int dy[NDIR]
    cdef int dx[NDIR]
    cdef double sw[NDIR]
    cdef Py_ssize_t lin[NDIR]
    cdef int64_t m = 0, written
    if sqrt_weights.shape[0] != NDIR:
        raise ValueError(f"sqrt_weights must have {NDIR} entries, got {sqrt_weights.shape[0]}")
    if n > MAX_VOXELS:
        raise ValueError(f"volume has {n} voxels; at most {MAX_VOXELS} are supported (int32 edge ids)")
    labels = np.zeros((nz, ny, nx), dtype=np.int32)
    if n == 0:
        return labels
    for d in range(NDIR):
        dz[d], dy[d], dx[d] = OFFSETS[d]
        sw[d] = sqrt_weights[d]
        lin[d] = (dz[d] * ny + dy[d]) * nx + dx[d]
        m += max(nz - dz[d], 0) * max(ny - abs(dy[d]), 0) * max(nx - abs(dx[d]), 0)

    cdef cnp.ndarray edges_a = np.empty(m, dtype=np.uint64)
    cdef cnp.ndarray edges_b = np.empty(m, dtype=np.uint64)
    cdef cnp.ndarray hist_arr = np.zeros(3 * RADIX_SIZE, dtype=np.int64)
    cdef uint64_t* pa = <uint64_t*>cnp.PyArray_DATA(edges_a)
    cdef uint64_t* pb = <uint64_t*>cnp.PyArray_DATA(edges_b)
    cdef int64_t* hist = <int64_t*>cnp.PyArray_DATA(hist_arr)
    cdef uint64_t* sorted_edges = NULL
    with nogil:
        written = _build_edges(&volume[0, 0, 0], nz, ny, nx, sw, dz, dy, dx, pa, hist)
        sorted_edges = _radix_sort(pa, pb, written, hist)
    if written != m:
        raise RuntimeError(f"internal error: counted {m} edges but wrote {written}")
    # the other buffer is no longer needed: release it before allocating the union-find arrays
    if sorted_edges == pa:
        edges_b = None
    else:
        edges_a = None

    _merge_into(sorted_edges, m, n, lin, k, min_size, labels)
    return labels


def merge_in_order(const uint64_t[::1] edges, tuple shape, double k, Py_ssize_t min_size):
    """The merge passes of :func:`segment` over edges already in the wanted order.

    ``edges[i] = float32 cost bits << 32 | (voxel * 13 + direction)``. Used to compare edge orders (e.g.
    NumPy's ``argsort`` as in the reference) with the same merging code.
    """
    cdef Py_ssize_t nz = shape[0], ny = shape[1], nx = shape[2]
    cdef Py_ssize_t n = nz * ny * nx
    cdef Py_ssize_t lin[NDIR]
    cdef int d
    for d in range(NDIR):
        lin[d] = (OFFSETS[d][0] * ny + OFFSETS[d][1]) * nx + OFFSETS[d][2]
    labels = np.zeros((nz, ny, nx), dtype=np.int32)
    if n == 0:
        return labels
    if edges.shape[0] > 0:
        _merge_into(&edges[0], edges.shape[0], n, lin, k, min_size, labels)
    return labels
