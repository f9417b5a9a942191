# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Graph-based segmentation (Felzenszwalb & Huttenlocher, IJCV 2004) of a 3D volume: the hot loops.

The Python face is :func:`fsmis_monai.pseudolabels.felzenszwalb_3d`; it validates the input, smooths it
and computes the per-direction weights. This module does what must be fast, without the GIL:

1. Edges. The 26-neighbourhood gives 13 directions (``OFFSETS``, in the order the ADNet generator lists
   them). Edge ``d * N + p`` joins voxel ``p`` to ``p + OFFSETS[d]``; edges are enumerated in increasing id,
   i.e. direction by direction and voxels in C order, which is the reference's own edge layout. The cost
   is ``sqrt(w[d] * (I(q) - I(p))**2)`` in float64, the reference's exact formula.
2. Order. Edges are sorted **stably** by exact float64 cost (ties by edge id). When the volume is
   quantised (0-255 rescaled integers, sigma 0) the costs take few distinct values: they are collected in
   a hash table, ranked, and the edges are placed by one counting-sort pass (O(edges), exact, stable).
   When there are too many distinct costs, ``segment`` reports it and the caller falls back to NumPy's
   stable comparison sort, which gives the same order.
3. Merging. Greedy union-find in that order with the criterion
   ``cost < min(Int(C1) + k/|C1|, Int(C2) + k/|C2|)`` (Int = cost of the last edge merged into C), then a
   second pass over the same order merging any pair where one side is smaller than ``min_size``.
4. Numbering. Components are numbered 0..n-1 in the order of their first voxel in C order.

Each edge is one 64-bit word ``(cost rank << 32) | edge id`` (+ one word of sort buffer): no per-direction
temporaries.
"""

import numpy as np

cimport numpy as cnp
from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

cnp.import_array()

# (dz, dy, dx) of the 13 directions, in the order of the ADNet generator's edge list (docs/reference.md#supervoxels):
# x, xy, y, x(-y) in-plane, then zx, zxy, zy, z(-x), z(-x)(-y), z(-y), zx(-y), z(-x)y, z.
OFFSETS = (
    (0, 1, 0), (0, 1, 1), (0, 0, 1), (0, 1, -1),
    (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, -1, 0), (1, -1, -1), (1, 0, -1), (1, 1, -1), (1, -1, 1), (1, 0, 0),
)
NUM_DIRECTIONS = 13
MAX_VOXELS = (2 ** 31 - 1) // 13  # edge ids d * N + p are 32-bit
DEFAULT_MAX_DISTINCT = 1 << 20  # distinct costs handled by the counting sort (hash table of 2x this)

DEF NDIR = 13
cdef uint64_t EMPTY = <uint64_t>(-1)  # never the bit pattern of a finite non-negative double
cdef uint64_t LOW32 = <uint64_t>0xFFFFFFFF


cdef struct Grid:
    Py_ssize_t nz, ny, nx, n
    Py_ssize_t lin[NDIR]
    int dz[NDIR]
    int dy[NDIR]
    int dx[NDIR]
    double inv_n


cdef Grid _grid(Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx):
    cdef Grid g
    cdef int d
    g.nz, g.ny, g.nx, g.n = nz, ny, nx, nz * ny * nx
    g.inv_n = 1.0 / g.n if g.n > 0 else 0.0
    for d in range(NDIR):
        g.dz[d], g.dy[d], g.dx[d] = OFFSETS[d]
        g.lin[d] = (g.dz[d] * ny + g.dy[d]) * nx + g.dx[d]
    return g


cdef int64_t _num_edges(Grid* g) noexcept nogil:
    cdef int64_t m = 0
    cdef int d
    for d in range(NDIR):
        m += max(g.nz - g.dz[d], 0) * max(g.ny - abs(g.dy[d]), 0) * max(g.nx - abs(g.dx[d]), 0)
    return m


cdef inline uint64_t _bits(double v) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &v, 8)
    return u


cdef inline void _decode(Grid* g, uint32_t eid, Py_ssize_t* p, Py_ssize_t* q) noexcept nogil:
    """Edge id -> its two voxels (``d = eid // N`` via a float reciprocal, corrected to be exact)."""
    cdef Py_ssize_t d = <Py_ssize_t>(eid * g.inv_n)
    if d * g.n > eid:
        d -= 1
    elif (d + 1) * g.n <= eid:
        d += 1
    p[0] = eid - d * g.n
    q[0] = p[0] + g.lin[d]


cdef struct Node:  # one union-find node per voxel: one cache line fetch per root instead of three
    int32_t parent
    int32_t size
    double internal  # Int(C): cost of the last edge merged into the component


cdef extern from *:
    void __builtin_prefetch(const void* addr) nogil

DEF PREFETCH = 16  # edges ahead: the union-find accesses are random, the edge list is sequential


cdef inline int32_t _find(Node* nodes, int32_t x) noexcept nogil:
    """Root of ``x`` with path halving."""
    while nodes[x].parent != x:
        nodes[x].parent = nodes[nodes[x].parent].parent
        x = nodes[x].parent
    return x


cdef inline int32_t _link(Node* nodes, int32_t ra, int32_t rb) noexcept nogil:
    """Union by size of two roots; returns the new root. (Which voxel is the root does not change the
    partition: components are numbered by their first voxel at the end.)"""
    if nodes[ra].size < nodes[rb].size:
        ra, rb = rb, ra
    nodes[rb].parent = ra
    nodes[ra].size += nodes[rb].size
    return ra


cdef inline void _prefetch_edge(Grid* g, Node* nodes, uint64_t word) noexcept nogil:
    cdef Py_ssize_t p, q
    _decode(g, <uint32_t>(word & LOW32), &p, &q)
    __builtin_prefetch(&nodes[p])
    __builtin_prefetch(&nodes[q])


cdef int64_t _edges(const double* vol, Grid* g, const double* w, uint64_t* words, uint64_t* keys,
                    int64_t* counts, int64_t capacity, int64_t max_distinct, double* costs) noexcept nogil:
    """Write every edge in id order.

    With ``costs == NULL``: ``words[i] = (hash slot of its cost << 32) | id``, counting each distinct cost;
    returns the number of distinct costs, or -1 once there are more than ``max_distinct``. Otherwise
    (fallback path): ``words[i] = id`` and ``costs[i]`` = its cost; returns 0.
    """
    cdef uint64_t golden = (<uint64_t>0x9E3779B9 << 32) | <uint64_t>0x7F4A7C15
    cdef uint64_t mask = <uint64_t>(capacity - 1), h, bits
    cdef int shift = 64
    cdef int64_t distinct = 0, i = 0
    cdef Py_ssize_t z, y, x, p, y0, y1, x0, x1
    cdef int d
    cdef double diff, cost
    while (<int64_t>1 << (64 - shift)) < capacity:
        shift -= 1
    for d in range(NDIR):
        y0 = 1 if g.dy[d] < 0 else 0
        y1 = g.ny - (1 if g.dy[d] > 0 else 0)
        x0 = 1 if g.dx[d] < 0 else 0
        x1 = g.nx - (1 if g.dx[d] > 0 else 0)
        for z in range(g.nz - g.dz[d]):
            for y in range(y0, y1):
                p = (z * g.ny + y) * g.nx + x0
                for x in range(x0, x1):
                    diff = vol[p + g.lin[d]] - vol[p]
                    cost = sqrt(w[d] * (diff * diff))
                    if costs != NULL:
                        costs[i] = cost
                        words[i] = <uint64_t>(d * g.n + p)
                    else:
                        bits = _bits(cost)
                        h = (bits * golden) >> shift
                        while keys[h] != bits and keys[h] != EMPTY:
                            h = (h + 1) & mask
                        if keys[h] == EMPTY:
                            if distinct == max_distinct:
                                return -1
                            keys[h] = bits
                            distinct += 1
                        counts[h] += 1
                        words[i] = (h << 32) | <uint64_t>(d * g.n + p)
                    i += 1
                    p += 1
    return distinct


DEF SMALL_QUICKSORT = 15
DEF QS_STACK = 128


cdef inline void _sift_down(const double* v, int32_t* a, int64_t i, int64_t n, int32_t tmp) noexcept nogil:
    """Place ``tmp`` in the 1-based max-heap ``a[1..n]`` starting from the hole at ``i``."""
    cdef int64_t j = i << 1
    while j <= n:
        if j < n and v[a[j]] < v[a[j + 1]]:
            j += 1
        if v[tmp] < v[a[j]]:
            a[i] = a[j]
            i = j
            j += j
        else:
            break
    a[i] = tmp


cdef void _heapsort_positions(const double* v, int32_t* tosort, int64_t n) noexcept nogil:
    """Heapsort of positions by value (the introsort's fallback when it recurses too deep)."""
    cdef int32_t* a = tosort - 1  # 1-based heap
    cdef int64_t l = n >> 1
    cdef int32_t tmp
    while l > 0:
        _sift_down(v, a, l, n, a[l])
        l -= 1
    while n > 1:
        tmp = a[n]
        a[n] = a[1]
        n -= 1
        _sift_down(v, a, 1, n, tmp)


cdef inline void _swap(int32_t* a, int64_t i, int64_t j) noexcept nogil:
    cdef int32_t t = a[i]
    a[i] = a[j]
    a[j] = t


cdef void _introsort_positions(const double* v, int32_t* a, int64_t num, int depth_limit) noexcept nogil:
    """Unstable argsort with the tie order of NumPy 1.x's default ``argsort`` for float64 (introsort:
    median-of-3 quicksort, insertion sort below 16 elements, heapsort past 2*log2(n) levels).

    The published supervoxels were made with it: with this order our merge reproduces them bit for bit.
    """
    cdef int64_t pl = 0, pr = num - 1, pm, pi, pj, pk, sp = 0
    cdef int64_t stack[QS_STACK]
    cdef int depths[QS_STACK]
    cdef int cdepth = depth_limit
    cdef int64_t u = num
    cdef int32_t vi
    cdef double vp
    if cdepth < 0:
        cdepth = 0
        while u > 1:
            u >>= 1
            cdepth += 1
        cdepth *= 2
    while True:
        if cdepth < 0:
            _heapsort_positions(v, a + pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if v[a[pm]] < v[a[pl]]:
                    _swap(a, pm, pl)
                if v[a[pr]] < v[a[pm]]:
                    _swap(a, pr, pm)
                if v[a[pm]] < v[a[pl]]:
                    _swap(a, pm, pl)
                vp = v[a[pm]]
                pi = pl
                pj = pr - 1
                _swap(a, pm, pj)
                while True:
                    pi += 1
                    while v[a[pi]] < vp:
                        pi += 1
                    pj -= 1
                    while vp < v[a[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    _swap(a, pi, pj)
                pk = pr - 1
                _swap(a, pi, pk)
                # push the larger side, continue with the smaller one
                if pi - pl < pr - pi:
                    stack[sp] = pi + 1
                    stack[sp + 1] = pr
                    pr = pi - 1
                else:
                    stack[sp] = pl
                    stack[sp + 1] = pi - 1
                    pl = pi + 1
                cdepth -= 1
                depths[sp >> 1] = cdepth
                sp += 2
            pi = pl + 1
            while pi <= pr:  # insertion sort
                vi = a[pi]
                vp = v[vi]
                pj = pi
                pk = pi - 1
                while pj > pl and vp < v[a[pk]]:
                    a[pj] = a[pk]
                    pj -= 1
                    pk -= 1
                a[pj] = vi
                pi += 1
        if sp == 0:
            break
        sp -= 2
        pl = stack[sp]
        pr = stack[sp + 1]
        cdepth = depths[sp >> 1]


def numpy1_argsort(const double[::1] values, int depth_limit=-1):
    """int32 positions sorting ``values`` in NumPy 1.x ``argsort`` order (``depth_limit`` < 0: 2*log2(n))."""
    order = np.arange(values.shape[0], dtype=np.int32)
    cdef int32_t[::1] o = order
    if values.shape[0] > 1:
        with nogil:
            _introsort_positions(&values[0], &o[0], values.shape[0], depth_limit)
    return order


cdef void _rank_in_order(const uint64_t* ids, uint64_t* dst, const int32_t* order, int64_t m) noexcept nogil:
    """Fallback path: ``dst[j] = (j << 32) | ids[order[j]]``."""
    cdef int64_t j
    for j in range(m):
        dst[j] = (<uint64_t>j << 32) | ids[order[j]]


cdef void _counting_sort(const uint64_t* src, uint64_t* dst, int64_t m, int64_t* start_of_slot,
                         const int64_t* rank_of_slot) noexcept nogil:
    """Stable placement by cost rank: ``dst`` gets ``(rank << 32) | id`` in (cost, id) order."""
    cdef int64_t i, slot, pos
    cdef uint64_t word
    for i in range(m):
        word = src[i]
        slot = <int64_t>(word >> 32)
        pos = start_of_slot[slot]
        start_of_slot[slot] = pos + 1
        dst[pos] = (<uint64_t>rank_of_slot[slot] << 32) | (word & LOW32)


cdef int64_t _merge(uint64_t* edges, int64_t m, Grid* g, const double* cost_of_rank, double k,
                    int64_t min_size, Node* nodes) noexcept nogil:
    """Both greedy passes over the sorted edges; returns the number of components.

    Pass 1 keeps (in place, in order) only the edges it could not merge: every other edge joins two voxels
    of one component for good, so pass 2 would skip it anyway. Pass 1 also stops early, exactly: every
    threshold ``Int(C) + k/|C|`` is at most ``c_last + k`` (``c_last`` = cost of the last merge), so once
    an edge costs that much no later edge can merge until something merges, and nothing will.
    """
    cdef int64_t e, kept = 0, nsmall, ncomp = g.n
    cdef uint64_t word
    cdef Py_ssize_t p, q
    cdef int32_t ra, rb
    cdef double cost, ta, tb, no_merge_from = k
    for p in range(g.n):
        nodes[p].parent = <int32_t>p
        nodes[p].size = 1
        nodes[p].internal = 0.0
    # pass 1: merge when the edge is lighter than both components' internal variation + k/|C|
    for e in range(m):
        if e + PREFETCH < m:
            _prefetch_edge(g, nodes, edges[e + PREFETCH])
        word = edges[e]
        cost = cost_of_rank[word >> 32]
        if cost >= no_merge_from:  # keep the rest as it is, for pass 2
            memmove(&edges[kept], &edges[e], (m - e) * sizeof(uint64_t))
            kept += m - e
            break
        _decode(g, <uint32_t>(word & LOW32), &p, &q)
        ra = _find(nodes, <int32_t>p)
        rb = _find(nodes, <int32_t>q)
        if ra == rb:
            continue
        ta = nodes[ra].internal + k / nodes[ra].size
        tb = nodes[rb].internal + k / nodes[rb].size
        if cost < (ta if ta < tb else tb):
            ra = _link(nodes, ra, rb)
            nodes[ra].internal = cost
            no_merge_from = cost + k
            ncomp -= 1
        else:
            edges[kept] = word
            kept += 1
    # pass 2: absorb components smaller than min_size, in the same edge order
    nsmall = 0
    for p in range(g.n):
        if nodes[p].parent == p and nodes[p].size < min_size:
            nsmall += 1
    e = 0
    while nsmall > 0 and e < kept:
        if e + PREFETCH < kept:
            _prefetch_edge(g, nodes, edges[e + PREFETCH])
        word = edges[e]
        e += 1
        _decode(g, <uint32_t>(word & LOW32), &p, &q)
        ra = _find(nodes, <int32_t>p)
        rb = _find(nodes, <int32_t>q)
        if ra == rb or (nodes[ra].size >= min_size and nodes[rb].size >= min_size):
            continue
        nsmall -= (nodes[ra].size < min_size) + (nodes[rb].size < min_size)
        ra = _link(nodes, ra, rb)
        nsmall += nodes[ra].size < min_size
        ncomp -= 1
    return ncomp


cdef void _number_components(Py_ssize_t n, Node* nodes, int32_t* out) noexcept nogil:
    """``out[p]`` = rank of p's component by its first voxel in C order."""
    cdef Py_ssize_t p
    cdef int32_t r, nxt = 0
    for p in range(n):
        r = _find(nodes, <int32_t>p)
        if nodes[r].size > 0:  # first visit of this root: mark it with -(rank + 1)
            nodes[r].size = -(nxt + 1)
            nxt += 1
        out[p] = -nodes[r].size - 1


cdef _merge_into(uint64_t* edges, int64_t m, Grid* g, const double* cost_of_rank, double k,
                 Py_ssize_t min_size, cnp.ndarray labels):
    """Run both passes without the GIL (``edges`` is reordered in place) and write component ranks into ``labels``."""
    cdef cnp.ndarray node_bytes = np.empty(g.n * sizeof(Node), dtype=np.uint8)
    cdef Node* nodes = <Node*>cnp.PyArray_DATA(node_bytes)
    cdef int32_t* po = <int32_t*>cnp.PyArray_DATA(labels)
    with nogil:
        _merge(edges, m, g, cost_of_rank, k, min_size, nodes)
        _number_components(g.n, nodes, po)


def sorted_edges(const double[:, :, ::1] volume, const double[::1] weights,
                 Py_ssize_t max_distinct=DEFAULT_MAX_DISTINCT, bint numpy1_order=False):
    """Edges in merge order: ``(words, cost_of_rank)`` with ``words[i] = rank << 32 | id``.

    Default: stable by exact cost, by a counting sort over the distinct costs when there are at most
    ``max_distinct`` of them, otherwise by ``np.argsort(kind="stable")`` (same order, more memory and time).
    ``numpy1_order=True``: the (unstable) order of NumPy 1.x's default ``argsort`` of the costs listed in
    id order, which is how the published supervoxels were made.
    """
    cdef Grid g = _grid(volume.shape[0], volume.shape[1], volume.shape[2])
    cdef double w[NDIR]
    cdef int d
    if weights.shape[0] != NDIR:
        raise ValueError(f"weights must have {NDIR} entries, got {weights.shape[0]}")
    if g.n > MAX_VOXELS:
        raise ValueError(f"volume has {g.n} voxels; at most {MAX_VOXELS} are supported (32-bit edge ids)")
    for d in range(NDIR):
        w[d] = weights[d]
    cdef int64_t m = _num_edges(&g)
    cdef int64_t capacity = 16, distinct = -1
    while capacity < 2 * max_distinct and not numpy1_order:
        capacity *= 2
    cdef cnp.ndarray words = np.empty(m, dtype=np.uint64)
    if g.n == 0 or m == 0:
        return words, np.zeros(0, dtype=np.float64)
    cdef cnp.ndarray keys = np.full(capacity, EMPTY, dtype=np.uint64)
    cdef cnp.ndarray counts = np.zeros(capacity, dtype=np.int64)
    cdef uint64_t* pw = <uint64_t*>cnp.PyArray_DATA(words)
    cdef uint64_t* pk = <uint64_t*>cnp.PyArray_DATA(keys)
    cdef int64_t* pn = <int64_t*>cnp.PyArray_DATA(counts)
    cdef double* pcost
    cdef int32_t* porder
    cdef uint64_t* pranked
    if max_distinct > 0 and not numpy1_order:
        with nogil:
            distinct = _edges(&volume[0, 0, 0], &g, w, pw, pk, pn, capacity, max_distinct, NULL)
    if distinct < 0:  # comparison sort of the costs listed in id order
        keys = counts = None
        costs = np.empty(m, dtype=np.float64)
        pcost = <double*>cnp.PyArray_DATA(costs)
        with nogil:
            _edges(&volume[0, 0, 0], &g, w, pw, NULL, NULL, 0, 0, pcost)
        if numpy1_order:
            order = numpy1_argsort(costs)
        else:
            order = np.argsort(costs, kind="stable").astype(np.int32)
        cost_of_rank = costs[order]
        costs = None
        ranked = np.empty(m, dtype=np.uint64)
        porder = <int32_t*>cnp.PyArray_DATA(order)
        pranked = <uint64_t*>cnp.PyArray_DATA(ranked)
        with nogil:
            _rank_in_order(pw, pranked, porder, m)
        return ranked, cost_of_rank
    slots = np.flatnonzero(keys != EMPTY)
    by_cost = slots[np.argsort(keys[slots].view(np.float64), kind="stable")]
    cost_of_rank = keys[by_cost].view(np.float64)
    rank_of_slot = np.zeros(capacity, dtype=np.int64)
    rank_of_slot[by_cost] = np.arange(by_cost.size)
    start_of_slot = np.zeros(capacity, dtype=np.int64)
    start_of_slot[by_cost] = np.cumsum(counts[by_cost]) - counts[by_cost]
    keys = counts = None
    cdef cnp.ndarray ranked_words = np.empty(m, dtype=np.uint64)
    cdef int64_t[::1] starts = start_of_slot
    cdef int64_t[::1] ranks = rank_of_slot
    with nogil:
        _counting_sort(pw, <uint64_t*>cnp.PyArray_DATA(ranked_words), m, &starts[0], &ranks[0])
    return ranked_words, np.ascontiguousarray(cost_of_rank)


def merge_in_order(words, cost_of_rank, tuple shape, double k, Py_ssize_t min_size):
    """The merge passes over edges already in the wanted order; int32 labels of ``shape`` (z, y, x).

    ``words[i] = rank << 32 | edge id`` with the edge's cost ``cost_of_rank[rank]``; the order of
    ``words`` is the merge order (so other orders, e.g. an unstable ``argsort``, can be compared).
    """
    return _merge_owned(np.array(words, dtype=np.uint64, copy=True), np.ascontiguousarray(cost_of_rank, dtype=np.float64),
                        shape, k, min_size)


cdef _merge_owned(uint64_t[::1] words, const double[::1] cost_of_rank, tuple shape, double k, Py_ssize_t min_size):
    """:func:`merge_in_order` on a buffer it may reorder."""
    cdef Grid g = _grid(shape[0], shape[1], shape[2])
    labels = np.zeros(shape, dtype=np.int32)
    if g.n == 0:
        return labels
    cdef uint64_t* pw = &words[0] if words.shape[0] > 0 else NULL
    cdef const double* pc = &cost_of_rank[0] if cost_of_rank.shape[0] > 0 else NULL
    _merge_into(pw, words.shape[0], &g, pc, k, min_size, labels)
    return labels


def segment(const double[:, :, ::1] volume, const double[::1] weights, double k, Py_ssize_t min_size,
            Py_ssize_t max_distinct=DEFAULT_MAX_DISTINCT, bint numpy1_order=False):
    """Felzenszwalb segmentation of a C-contiguous float64 volume; int32 labels 0..n-1 of the same shape.

    ``weights[d]`` is the squared-length weight of direction ``OFFSETS[d]``; ``k`` is the merge scale
    (already divided by 255); see :func:`sorted_edges` for the edge order. Validation is the caller's job
    (see ``fsmis_monai.pseudolabels``).
    """
    words, cost_of_rank = sorted_edges(volume, weights, max_distinct, numpy1_order)
    return _merge_owned(words, cost_of_rank, (volume.shape[0], volume.shape[1], volume.shape[2]), k, min_size)
