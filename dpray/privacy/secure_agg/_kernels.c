/*
 * The compiled hot loop of secure aggregation: one round of Hörmann's PTRS Poisson sampler, which
 * draws the Skellam noise share on the training worker's side thread.
 *
 * Why C: the numpy form (csprng._ptrs_chunk) makes ~20 passes over each chunk and spends ~45 ms
 * of a side thread's CPU per 2^20-coordinate Skellam share, which on a saturated 2-core node is
 * taken from the training threads.  This kernel makes one pass per element (the exact acceptance
 * test only for the ~20% that miss the quick accept, gathered first), without the GIL.  (The
 * encode's rounding and the decode's residues were tried here too: they are memory bound, and
 * compiled they were no faster than their chunked numpy forms.)
 *
 * Bit-identical to the numpy form for the same words: every floating-point operation is done in
 * the same order and the same IEEE double precision (the build passes -ffp-contract=off so no
 * multiply-add is fused), the log-factorial table comes from the caller, and the only library
 * calls are log and log1p, where the C library and numpy's vectorised log may differ in the last
 * bit; that can change a draw only if the acceptance test ties to within one ulp
 * (tests/test_secure_agg.py checks identity on millions of draws).
 *
 * Interface (called by dpray.privacy.secure_agg.csprng, which owns the keystream and the
 * rejection rounds; buffers are C-contiguous):
 *
 *   ptrs_round(u_words, v_words, lam, loglam, a, b, log_invalpha, vr, log_factorial,
 *              draws, accept, rejected[, base]) -> number rejected
 *
 * u_words, v_words: uint64[m] (read only); log_factorial: float64 log(k!) for k < 10; draws
 * (int64[m]), accept (bool/uint8[m]) and rejected (int64, at least m) are written: the candidate
 * where accepted and 0 where rejected (a rejected candidate may not fit an int64), the
 * acceptance, and the rejected positions plus `base` (default 0) in ascending order (the first
 * `number rejected` entries): a caller feeding a long round block by block passes each block's
 * start as `base` and the rest of its rejected array.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The candidate loop is compiled three times on x86-64 Linux (AVX-512, AVX2, baseline) and the
 * loader picks the best the CPU has: the baseline has no vector floor or uint64->double
 * conversion.  Elsewhere it is compiled once, for the target's baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define STIRLING_MIN 10.0
#define N_LOG_FACTORIAL 10
#define BLOCK 2048 /* elements per block: its three float64 arrays (48 KiB) stay in L1/L2 */

typedef struct {
    double lam, loglam, a, b, log_invalpha, vr;
    double log_factorial[N_LOG_FACTORIAL];
} ptrs_constants;

/* k·log λ - λ - log k!, as csprng._log_poisson_pmf computes it (same operation order). */
static double log_poisson_pmf(double k, const ptrs_constants *c) {
    double kk = k > 0.0 ? k : 0.0; /* np.maximum(k, 0.0) */
    if (kk < STIRLING_MIN) {
        return kk * c->loglam - c->lam - c->log_factorial[(int64_t)kk];
    }
    double big = kk; /* np.maximum(kk, 10.0) */
    double d = big - c->lam;
    double inv = 1.0 / big;
    double inv2 = inv * inv;
    double series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0));
    return d - big * log1p(d / c->lam) - 0.5 * log((2.0 * M_PI) * big) - series;
}

/* Words to (0, 1) uniforms as csprng._words_to_uniform: ((w >> 11) + 0.5) * 2^-53. */
static inline double uniform(uint64_t w) {
    return ((double)(w >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

/* Candidates and the quick acceptance for one block; branch free so the compiler vectorises it. */
VECTOR_CLONES
static void candidates(const uint64_t *uw, const uint64_t *vw, Py_ssize_t n, double lam,
                       double two_a, double b, double vr, double *k, double *us, double *v,
                       uint8_t *acc) {
    for (Py_ssize_t i = 0; i < n; i++) {
        double u = uniform(uw[i]) - 0.5;
        double vi = uniform(vw[i]);
        double usi = 0.5 - fabs(u);
        double ki = two_a / usi;
        ki += b;
        ki *= u;
        ki += lam;
        ki += 0.43;
        k[i] = floor(ki);
        us[i] = usi;
        v[i] = vi;
        acc[i] = (uint8_t)((usi >= 0.07) & (vi <= vr));
    }
}

/* The whole round; rejected positions (plus `base`) go to `rejected` in ascending order, and
 * their count is returned. */
static Py_ssize_t ptrs_kernel(const uint64_t *u_words, const uint64_t *v_words, Py_ssize_t m,
                              const ptrs_constants *c, int64_t *draws, uint8_t *accept,
                              int64_t *rejected, int64_t base) {
    double k[BLOCK], us[BLOCK], v[BLOCK];
    int32_t slow[BLOCK];
    Py_ssize_t n_rejected = 0;
    for (Py_ssize_t start = 0; start < m; start += BLOCK) {
        Py_ssize_t n = m - start < BLOCK ? m - start : BLOCK;
        uint8_t *acc = accept + start;
        candidates(u_words + start, v_words + start, n, c->lam, 2.0 * c->a, c->b, c->vr, k, us,
                   v, acc);
        /* the exact test for the ~20% that missed the quick acceptance, gathered first so the
         * branch is not mispredicted element by element */
        int n_slow = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            slow[n_slow] = (int32_t)i;
            n_slow += !acc[i];
        }
        for (int j = 0; j < n_slow; j++) {
            int i = slow[j];
            double ks = k[i], uss = us[i], vs = v[i];
            int reject = (ks < 0.0) | ((uss < 0.013) & (vs > uss));
            if (!reject) {
                double lhs = log(vs) + c->log_invalpha - log(c->a / (uss * uss) + c->b);
                acc[i] = (uint8_t)(lhs <= log_poisson_pmf(ks, c));
            }
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            draws[start + i] = acc[i] ? (int64_t)k[i] : 0;
        }
        for (int j = 0; j < n_slow; j++) {
            rejected[n_rejected] = base + start + slow[j];
            n_rejected += !acc[slow[j]];
        }
    }
    return n_rejected;
}

/* A C-contiguous buffer of `itemsize`-byte items whose struct format (native or little-endian
 * byte order) is one of the letters in `codes`: exactly `count` items (any count if count < 0),
 * or at least `count` with `at_least`. */
static int get_buffer_ex(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize,
                         const char *codes, Py_ssize_t count, int at_least, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    const char *format = view->format != NULL ? view->format : "B";
    if (*format == '@' || *format == '=' || *format == '<') {
        format++;
    }
    if (view->itemsize != itemsize || strlen(format) != 1 || strchr(codes, *format) == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: expected items of format %s and %zd bytes, got %s",
                     name, codes, itemsize, view->format != NULL ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    int bad_count = count >= 0 && (at_least ? view->len < count * itemsize
                                            : view->len != count * itemsize);
    if (bad_count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %s%zd items, got %zd", name,
                     at_least ? "at least " : "", count, view->len / itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize,
                      const char *codes, Py_ssize_t count, const char *name) {
    return get_buffer_ex(obj, view, writable, itemsize, codes, count, 0, name);
}

#define UINT64_CODES "QL"
#define INT64_CODES "ql"
#define FLOAT64_CODES "d"
#define BOOL_CODES "?B"

static PyObject *ptrs_round(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *u_obj, *v_obj, *table_obj, *draws_obj, *accept_obj, *rejected_obj;
    ptrs_constants c;
    long long base = 0;
    if (!PyArg_ParseTuple(args, "OOddddddOOOO|L:ptrs_round", &u_obj, &v_obj, &c.lam, &c.loglam,
                          &c.a, &c.b, &c.log_invalpha, &c.vr, &table_obj, &draws_obj,
                          &accept_obj, &rejected_obj, &base)) {
        return NULL;
    }
    if (!(c.lam >= STIRLING_MIN) || !isfinite(c.lam)) {
        PyErr_SetString(PyExc_ValueError, "PTRS needs a finite lam >= 10");
        return NULL;
    }
    Py_buffer u, v, table, draws, accept, rejected;
    if (get_buffer(u_obj, &u, 0, 8, UINT64_CODES, -1, "u_words") < 0) {
        return NULL;
    }
    Py_ssize_t m = u.len / 8;
    if (get_buffer(v_obj, &v, 0, 8, UINT64_CODES, m, "v_words") < 0) {
        goto fail_u;
    }
    if (get_buffer(table_obj, &table, 0, 8, FLOAT64_CODES, N_LOG_FACTORIAL, "log_factorial") < 0) {
        goto fail_v;
    }
    if (get_buffer(draws_obj, &draws, 1, 8, INT64_CODES, m, "draws") < 0) {
        goto fail_table;
    }
    if (get_buffer(accept_obj, &accept, 1, 1, BOOL_CODES, m, "accept") < 0) {
        goto fail_draws;
    }
    if (get_buffer_ex(rejected_obj, &rejected, 1, 8, INT64_CODES, m, 1, "rejected") < 0) {
        goto fail_accept;
    }
    memcpy(c.log_factorial, table.buf, sizeof(c.log_factorial));
    Py_ssize_t n_rejected;
    Py_BEGIN_ALLOW_THREADS
    n_rejected = ptrs_kernel((const uint64_t *)u.buf, (const uint64_t *)v.buf, m, &c,
                             (int64_t *)draws.buf, (uint8_t *)accept.buf, (int64_t *)rejected.buf,
                             (int64_t)base);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&rejected);
    PyBuffer_Release(&accept);
    PyBuffer_Release(&draws);
    PyBuffer_Release(&table);
    PyBuffer_Release(&v);
    PyBuffer_Release(&u);
    return PyLong_FromSsize_t(n_rejected);

fail_accept:
    PyBuffer_Release(&accept);
fail_draws:
    PyBuffer_Release(&draws);
fail_table:
    PyBuffer_Release(&table);
fail_v:
    PyBuffer_Release(&v);
fail_u:
    PyBuffer_Release(&u);
    return NULL;
}

static PyMethodDef methods[] = {
    {"ptrs_round", ptrs_round, METH_VARARGS,
     "One PTRS round: candidates into draws (0 where rejected), acceptance into accept, the "
     "rejected positions into rejected; returns how many were rejected."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_kernels",
    "The compiled PTRS round of secure aggregation (see _kernels.c).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
