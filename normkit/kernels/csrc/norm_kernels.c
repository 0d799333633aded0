/*
 * normkit fused CPU kernels: the four full-size passes of a normalization and the
 * O(N*C) Switchable-Normalization mixer (Luo et al., ICLR 2019, arXiv:1806.10779).
 *
 * Plain C11 + OpenMP, no torch headers: built at install time (normkit/kernels/_build.py)
 * and called only by normkit/kernels/cpu.py after the operators of normkit/kernels/ops.py
 * have validated every tensor. Tensors are viewed as (N, C, L) ("NCL", channels-first rows
 * of L contiguous values) or (N, L, C) ("NLC", channels-last). Element types: float32,
 * float64, bfloat16, float16 (when the compiler has _Float16). Statistics are float32
 * (float64 for float64 input) and accumulated in double.
 *
 * Moments use a shifted scheme: every (n, c) is shifted by one of its own values before
 * summing d and d^2 in double, so 1e4 + N(0, 1) in float32 keeps all its digits; float64
 * inputs get a second, corrective pass around the first mean.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

#define NK_API __attribute__((visibility("default")))
#define MIN_PARALLEL_ELEMS 32768 /* below this, fork/join costs more than it saves */
#define BLOCK 128                /* values summed in the statistics type before a double flush */

static int threads_for(i64 elems, int nt) { return (elems < MIN_PARALLEL_ELEMS || nt < 1) ? 1 : nt; }

/* ---- element loads/stores ---------------------------------------------------------- */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define LD_ID(v) (v)
#define ST_F32(v) ((float)(v))
#define ST_F64(v) ((double)(v))
#define LD_BF16(v) bf16_to_f32(v)
#define ST_BF16(v) f32_to_bf16((float)(v))
#ifdef __FLT16_MAX__
#define NK_HAS_HALF 1
typedef _Float16 half_t;
#define LD_F16(v) ((float)(v))
#define ST_F16(v) ((_Float16)(float)(v))
#else
#define NK_HAS_HALF 0
#endif

/* Split L into chunks so that N * chunks work units keep every thread busy (NLC only). */
static i64 nlc_chunks(i64 n, i64 l, int nt) {
    if (nt <= 1 || n >= 4 * nt) return 1;
    i64 want = (4 * nt + n - 1) / n;
    return want < l ? want : (l > 0 ? l : 1);
}

/* Sum over the chunks of sample n the double partials a[c] and a[C + c] that the
   channels-last reductions leave in their workspace (one unit of unit_bytes per chunk). */
static void chunk_sums(const char *ws, size_t unit_bytes, i64 n, i64 chunks, i64 C, i64 c, double *s1,
                       double *s2) {
    double t1 = 0.0, t2 = 0.0;
    for (i64 j = 0; j < chunks; j++) {
        const double *a = (const double *)(ws + unit_bytes * (size_t)(n * chunks + j));
        t1 += a[c];
        t2 += a[C + c];
    }
    *s1 = t1;
    *s2 = t2;
}

/*
 * DEFINE_KERNELS(SFX, T, S, LD, ST): kernels for element type T with statistics type S
 * (float or double); LD/ST convert an element to/from float (double for float64).
 */
#define DEFINE_KERNELS(SFX, T, S, LD, ST)                                                        \
    /* shifted sums of one (n, c) row (NCL): s1 = sum(x - k), s2 = sum((x - k)^2), in blocks \
       of BLOCK values summed in S (vectorised) and flushed to double */                        \
    static void row_sums_##SFX(const T *restrict x, i64 len, double k, double *s1o, double *s2o) { \
        double s1 = 0.0, s2 = 0.0;                                                              \
        const S ks = (S)k;                                                                      \
        for (i64 i0 = 0; i0 < len; i0 += BLOCK) {                                               \
            i64 i1 = i0 + BLOCK < len ? i0 + BLOCK : len;                                       \
            S a = 0, b = 0;                                                                     \
            _Pragma("omp simd reduction(+ : a, b)") for (i64 i = i0; i < i1; i++) {             \
                S d = (S)LD(x[i]) - ks;                                                         \
                a += d;                                                                         \
                b += d * d;                                                                     \
            }                                                                                   \
            s1 += (double)a;                                                                    \
            s2 += (double)b;                                                                    \
        }                                                                                       \
        *s1o = s1;                                                                              \
        *s2o = s2;                                                                              \
    }                                                                                           \
    static void moments_ncl_##SFX(const T *restrict x, i64 N, i64 C, i64 L, S *mean, S *var,   \
                                  int two_pass, int nt) {                                       \
        i64 rows = N * C;                                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")               \
        for (i64 r = 0; r < rows; r++) {                                                        \
            const T *xr = x + r * L;                                                            \
            double k = (double)LD(xr[0]), s1, s2;                                               \
            row_sums_##SFX(xr, L, k, &s1, &s2);                                                 \
            if (two_pass) {                                                                     \
                k += s1 / (double)L;                                                            \
                row_sums_##SFX(xr, L, k, &s1, &s2);                                             \
            }                                                                                   \
            double m = s1 / (double)L, v = s2 / (double)L - m * m;                              \
            mean[r] = (S)(k + m);                                                               \
            var[r] = (S)(v < 0.0 ? 0.0 : v); /* NaN stays NaN */                              \
        }                                                                                       \
    }                                                                                           \
    static int moments_nlc_##SFX(const T *restrict x, i64 N, i64 C, i64 L, S *mean, S *var,     \
                                 int two_pass, int nt) {                                        \
        i64 chunks = nlc_chunks(N, L, nt), units = N * chunks;                                 \
        size_t unit_bytes = (size_t)C * (2 * sizeof(double) + 3 * sizeof(S));                   \
        char *ws = (char *)malloc(unit_bytes * (size_t)units + sizeof(double) * (size_t)(N * C)); \
        if (!ws) return -1;                                                                     \
        double *shift = (double *)(ws + unit_bytes * (size_t)units);                            \
        for (i64 n = 0; n < N; n++)                                                             \
            for (i64 c = 0; c < C; c++) shift[n * C + c] = (double)LD(x[n * L * C + c]);        \
        for (int pass = 0; pass <= two_pass; pass++) {                                          \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 u = 0; u < units; u++) {                                                   \
                i64 n = u / chunks, j = u % chunks;                                             \
                i64 l0 = L * j / chunks, l1 = L * (j + 1) / chunks;                             \
                double *restrict a = (double *)(ws + unit_bytes * (size_t)u), *restrict b = a + C; \
                S *restrict fa = (S *)(b + C), *restrict fb = fa + C, *restrict ks = fb + C;    \
                memset(a, 0, sizeof(double) * (size_t)(2 * C));                                \
                for (i64 c = 0; c < C; c++) ks[c] = (S)shift[n * C + c];                        \
                for (i64 b0 = l0; b0 < l1; b0 += BLOCK) {                                       \
                    i64 b1 = b0 + BLOCK < l1 ? b0 + BLOCK : l1;                                 \
                    memset(fa, 0, sizeof(S) * (size_t)(2 * C));                                 \
                    for (i64 l = b0; l < b1; l++) {                                             \
                        const T *restrict xr = x + (n * L + l) * C;                             \
                        _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                       \
                            S d = (S)LD(xr[c]) - ks[c];                                         \
                            fa[c] += d;                                                         \
                            fb[c] += d * d;                                                     \
                        }                                                                       \
                    }                                                                           \
                    _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                           \
                        a[c] += (double)fa[c];                                                  \
                        b[c] += (double)fb[c];                                                  \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            for (i64 n = 0; n < N; n++)                                                         \
                for (i64 c = 0; c < C; c++) {                                                   \
                    double s1, s2;                                                          \
                    chunk_sums(ws, unit_bytes, n, chunks, C, c, &s1, &s2);                  \
                    double m = s1 / (double)L, v = s2 / (double)L - m * m;                      \
                    if (pass < two_pass) {                                                      \
                        shift[n * C + c] += m;                                                  \
                    } else {                                                                    \
                        mean[n * C + c] = (S)(shift[n * C + c] + m);                            \
                        var[n * C + c] = (S)(v < 0.0 ? 0.0 : v);                                \
                    }                                                                           \
                }                                                                               \
        }                                                                                       \
        free(ws);                                                                               \
        return 0;                                                                               \
    }                                                                                           \
    NK_API int nk_moments_##SFX(int nlc, const T *x, i64 N, i64 C, i64 L, S *mean, S *var,     \
                                int nt) {                                                       \
        nt = threads_for(N * C * L, nt);                                                        \
        int two_pass = sizeof(S) == sizeof(double);                                             \
        if (nlc) return moments_nlc_##SFX(x, N, C, L, mean, var, two_pass, nt);                 \
        moments_ncl_##SFX(x, N, C, L, mean, var, two_pass, nt);                                 \
        return 0;                                                                               \
    }                                                                                           \
    /* y = (x - mu[n,c]) * scale[n,c] + shift[c] */                                             \
    NK_API void nk_apply_##SFX(int nlc, const T *restrict x, T *restrict y, i64 N, i64 C, i64 L, \
                               const S *restrict mu, const S *restrict sc,                      \
                               const S *restrict sh, int nt) {                                  \
        nt = threads_for(N * C * L, nt);                                                        \
        if (nlc) {                                                                              \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * L; r++) {                                                   \
                i64 n = r / L;                                                                  \
                const T *restrict xr = x + r * C;                                               \
                T *restrict yr = y + r * C;                                                     \
                const S *restrict m = mu + n * C, *restrict s = sc + n * C;                     \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) yr[c] =                         \
                    ST(((S)LD(xr[c]) - m[c]) * s[c] + sh[c]);                                   \
            }                                                                                   \
        } else {                                                                                \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * C; r++) {                                                   \
                const T *restrict xr = x + r * L;                                               \
                T *restrict yr = y + r * L;                                                     \
                const S m = mu[r], s = sc[r], b = sh[r % C];                                    \
                _Pragma("omp simd") for (i64 i = 0; i < L; i++) yr[i] =                         \
                    ST(((S)LD(xr[i]) - m) * s + b);                                             \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    /* sum_dy[n,c] = sum dy, sum_dy_xc[n,c] = sum dy * (x - mean[n,c]); S blocks, double totals */ \
    NK_API int nk_reduce_##SFX(int nlc, const T *restrict dy, const T *restrict x, i64 N, i64 C, \
                               i64 L, const S *restrict mean, S *sdy, S *sdyxc, int nt) {       \
        nt = threads_for(N * C * L, nt);                                                        \
        if (!nlc) {                                                                             \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * C; r++) {                                                   \
                const T *restrict g = dy + r * L, *restrict xr = x + r * L;                     \
                const S m = mean[r];                                                            \
                double s1 = 0.0, s2 = 0.0;                                                      \
                for (i64 i0 = 0; i0 < L; i0 += BLOCK) {                                         \
                    i64 i1 = i0 + BLOCK < L ? i0 + BLOCK : L;                                   \
                    S a = 0, b = 0;                                                             \
                    _Pragma("omp simd reduction(+ : a, b)") for (i64 i = i0; i < i1; i++) {     \
                        S gi = (S)LD(g[i]);                                                     \
                        a += gi;                                                                \
                        b += gi * ((S)LD(xr[i]) - m);                                           \
                    }                                                                           \
                    s1 += (double)a;                                                            \
                    s2 += (double)b;                                                            \
                }                                                                               \
                sdy[r] = (S)s1;                                                                 \
                sdyxc[r] = (S)s2;                                                               \
            }                                                                                   \
            return 0;                                                                           \
        }                                                                                       \
        i64 chunks = nlc_chunks(N, L, nt), units = N * chunks;                                 \
        size_t unit_bytes = (size_t)C * (2 * sizeof(double) + 2 * sizeof(S));                   \
        char *ws = (char *)malloc(unit_bytes * (size_t)units);                                  \
        if (!ws) return -1;                                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")               \
        for (i64 u = 0; u < units; u++) {                                                       \
            i64 n = u / chunks, j = u % chunks;                                                 \
            i64 l0 = L * j / chunks, l1 = L * (j + 1) / chunks;                                 \
            double *restrict a = (double *)(ws + unit_bytes * (size_t)u), *restrict b = a + C;  \
            S *restrict fa = (S *)(b + C), *restrict fb = fa + C;                               \
            const S *restrict m = mean + n * C;                                                 \
            memset(a, 0, sizeof(double) * (size_t)(2 * C));                                    \
            for (i64 b0 = l0; b0 < l1; b0 += BLOCK) {                                           \
                i64 b1 = b0 + BLOCK < l1 ? b0 + BLOCK : l1;                                     \
                memset(fa, 0, sizeof(S) * (size_t)(2 * C));                                     \
                for (i64 l = b0; l < b1; l++) {                                                 \
                    const T *restrict g = dy + (n * L + l) * C, *restrict xr = x + (n * L + l) * C; \
                    _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                           \
                        S gi = (S)LD(g[c]);                                                     \
                        fa[c] += gi;                                                            \
                        fb[c] += gi * ((S)LD(xr[c]) - m[c]);                                    \
                    }                                                                           \
                }                                                                               \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                               \
                    a[c] += (double)fa[c];                                                      \
                    b[c] += (double)fb[c];                                                      \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (i64 n = 0; n < N; n++)                                                             \
            for (i64 c = 0; c < C; c++) {                                                       \
                double s1, s2;                                                              \
                chunk_sums(ws, unit_bytes, n, chunks, C, c, &s1, &s2);                      \
                sdy[n * C + c] = (S)s1;                                                         \
                sdyxc[n * C + c] = (S)s2;                                                       \
            }                                                                                   \
        free(ws);                                                                               \
        return 0;                                                                               \
    }                                                                                           \
    /* dx = dy * scale[n,c] + (x - mean[n,c]) * q[n,c] + p[n,c] */                              \
    NK_API void nk_backward_apply_##SFX(int nlc, const T *restrict dy, const T *restrict x,      \
                                        T *restrict dx, i64 N, i64 C, i64 L,                    \
                                        const S *restrict mean, const S *restrict sc,           \
                                        const S *restrict p, const S *restrict q, int nt) {     \
        nt = threads_for(N * C * L, nt);                                                        \
        if (nlc) {                                                                              \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * L; r++) {                                                   \
                i64 o = (r / L) * C;                                                            \
                const T *restrict g = dy + r * C, *restrict xr = x + r * C;                     \
                T *restrict d = dx + r * C;                                                     \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) d[c] =                          \
                    ST((S)LD(g[c]) * sc[o + c] + ((S)LD(xr[c]) - mean[o + c]) * q[o + c] +      \
                       p[o + c]);                                                               \
            }                                                                                   \
        } else {                                                                                \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * C; r++) {                                                   \
                const T *restrict g = dy + r * L, *restrict xr = x + r * L;                     \
                T *restrict d = dx + r * L;                                                     \
                const S m = mean[r], s = sc[r], pp = p[r], qq = q[r];                           \
                _Pragma("omp simd") for (i64 i = 0; i < L; i++) d[i] =                          \
                    ST((S)LD(g[i]) * s + ((S)LD(xr[i]) - m) * qq + pp);                         \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_KERNELS(f32, float, float, LD_ID, ST_F32)
DEFINE_KERNELS(f64, double, double, LD_ID, ST_F64)
DEFINE_KERNELS(bf16, uint16_t, float, LD_BF16, ST_BF16)
#if NK_HAS_HALF
DEFINE_KERNELS(f16, half_t, float, LD_F16, ST_F16)
#endif

/* ---- masked passes ----------------------------------------------------------------------
 * The same four passes over the valid positions only. mask holds N*L bytes, mask[n*L + l]
 * nonzero = position l of sample n is valid (L in the layout's position order, the same for
 * NCL and NLC). Padded values never enter arithmetic whose result is kept: channels-first
 * rows select (never multiply: 0 * NaN = NaN), channels-last skips padded positions whole.
 * nk_moments_masked_* also writes the per-sample count of valid positions (count[n], in S);
 * a sample with none gets mean 0 and variance 0. Padded outputs (y, dx) are 0. The shift of
 * the shifted sums is the row's first valid value; float64 gets the corrective second pass.
 * Channels-first loops select with a bitwise AND against an all-ones / all-zeros word per
 * position (built once per call from the mask: GCC vectorises that, but not a `v ? a : 0`
 * on the byte mask, which ran 10x slower); AND with zero gives +0 whatever the value was.
 */
static inline float keep_f(float d, uint32_t m) {
    union { float f; uint32_t u; } q;
    q.f = d;
    q.u &= m;
    return q.f;
}
static inline double keep_d(double d, uint64_t m) {
    union { double f; uint64_t u; } q;
    q.f = d;
    q.u &= m;
    return q.f;
}
static i64 first_valid(const uint8_t *m, i64 L) {
    i64 f = 0;
    while (f < L && !m[f]) f++;
    return f;
}
static i64 count_valid(const uint8_t *m, i64 L) {
    i64 t = 0;
    for (i64 l = 0; l < L; l++) t += m[l] != 0;
    return t;
}

/* the N*L words of all ones (valid) or zeros (padded) that the channels-first loops AND with */
#define DEFINE_MASK_WORDS(MT)                                                                   \
    static MT *mask_words_##MT(const uint8_t *mask, i64 NL) {                                   \
        MT *w = (MT *)malloc(sizeof(MT) * (size_t)(NL > 0 ? NL : 1));                          \
        if (!w) return NULL;                                                                    \
        for (i64 i = 0; i < NL; i++) w[i] = mask[i] ? (MT)~(MT)0 : (MT)0;                       \
        return w;                                                                               \
    }
DEFINE_MASK_WORDS(uint32_t)
DEFINE_MASK_WORDS(uint64_t)

#define DEFINE_MASKED_KERNELS(SFX, T, S, LD, ST, MT, KEEP)                                       \
    static void row_sums_masked_##SFX(const T *restrict x, const MT *restrict v, i64 len,        \
                                      double k, double *s1o, double *s2o) {                     \
        double s1 = 0.0, s2 = 0.0;                                                              \
        const S ks = (S)k;                                                                      \
        for (i64 i0 = 0; i0 < len; i0 += BLOCK) {                                               \
            i64 i1 = i0 + BLOCK < len ? i0 + BLOCK : len;                                       \
            S a = 0, b = 0;                                                                     \
            _Pragma("omp simd reduction(+ : a, b)") for (i64 i = i0; i < i1; i++) {             \
                S d = KEEP((S)LD(x[i]) - ks, v[i]);                                             \
                a += d;                                                                         \
                b += d * d;                                                                     \
            }                                                                                   \
            s1 += (double)a;                                                                    \
            s2 += (double)b;                                                                    \
        }                                                                                       \
        *s1o = s1;                                                                              \
        *s2o = s2;                                                                              \
    }                                                                                           \
    static int moments_masked_ncl_##SFX(const T *restrict x, const uint8_t *restrict mask,      \
                                        i64 N, i64 C, i64 L, const i64 *cnt, S *mean, S *var,   \
                                        int two_pass, int nt) {                                 \
        i64 rows = N * C;                                                                       \
        MT *words = mask_words_##MT(mask, N * L);                                               \
        if (!words) return -1;                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")               \
        for (i64 r = 0; r < rows; r++) {                                                        \
            const i64 n = r / C, cn = cnt[n];                                                   \
            const T *xr = x + r * L;                                                            \
            const uint8_t *mr = mask + n * L;                                                   \
            const MT *wr = words + n * L;                                                       \
            if (cn == 0) {                                                                      \
                mean[r] = (S)0;                                                                 \
                var[r] = (S)0;                                                                  \
                continue;                                                                       \
            }                                                                                   \
            double k = (double)LD(xr[first_valid(mr, L)]), s1, s2;                              \
            row_sums_masked_##SFX(xr, wr, L, k, &s1, &s2);                                      \
            if (two_pass) {                                                                     \
                k += s1 / (double)cn;                                                           \
                row_sums_masked_##SFX(xr, wr, L, k, &s1, &s2);                                  \
            }                                                                                   \
            double m = s1 / (double)cn, v = s2 / (double)cn - m * m;                            \
            mean[r] = (S)(k + m);                                                               \
            var[r] = (S)(v < 0.0 ? 0.0 : v);                                                    \
        }                                                                                       \
        free(words);                                                                            \
        return 0;                                                                               \
    }                                                                                           \
    static int moments_masked_nlc_##SFX(const T *restrict x, const uint8_t *restrict mask,      \
                                        i64 N, i64 C, i64 L, const i64 *cnt, S *mean, S *var,   \
                                        int two_pass, int nt) {                                 \
        i64 chunks = nlc_chunks(N, L, nt), units = N * chunks;                                 \
        size_t unit_bytes = (size_t)C * (2 * sizeof(double) + 3 * sizeof(S));                   \
        char *ws = (char *)malloc(unit_bytes * (size_t)units + sizeof(double) * (size_t)(N * C)); \
        if (!ws) return -1;                                                                     \
        double *shift = (double *)(ws + unit_bytes * (size_t)units);                            \
        for (i64 n = 0; n < N; n++) {                                                           \
            i64 f = first_valid(mask + n * L, L);                                               \
            for (i64 c = 0; c < C; c++)                                                         \
                shift[n * C + c] = f < L ? (double)LD(x[(n * L + f) * C + c]) : 0.0;            \
        }                                                                                       \
        for (int pass = 0; pass <= two_pass; pass++) {                                          \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 u = 0; u < units; u++) {                                                   \
                i64 n = u / chunks, j = u % chunks;                                             \
                i64 l0 = L * j / chunks, l1 = L * (j + 1) / chunks;                             \
                double *restrict a = (double *)(ws + unit_bytes * (size_t)u), *restrict b = a + C; \
                S *restrict fa = (S *)(b + C), *restrict fb = fa + C, *restrict ks = fb + C;    \
                const uint8_t *mr = mask + n * L;                                               \
                memset(a, 0, sizeof(double) * (size_t)(2 * C));                                \
                for (i64 c = 0; c < C; c++) ks[c] = (S)shift[n * C + c];                        \
                for (i64 b0 = l0; b0 < l1; b0 += BLOCK) {                                       \
                    i64 b1 = b0 + BLOCK < l1 ? b0 + BLOCK : l1;                                 \
                    memset(fa, 0, sizeof(S) * (size_t)(2 * C));                                 \
                    for (i64 l = b0; l < b1; l++) {                                             \
                        if (!mr[l]) continue; /* a padded position: nothing of it is read */    \
                        const T *restrict xr = x + (n * L + l) * C;                             \
                        _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                       \
                            S d = (S)LD(xr[c]) - ks[c];                                         \
                            fa[c] += d;                                                         \
                            fb[c] += d * d;                                                     \
                        }                                                                       \
                    }                                                                           \
                    _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                           \
                        a[c] += (double)fa[c];                                                  \
                        b[c] += (double)fb[c];                                                  \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            for (i64 n = 0; n < N; n++) {                                                       \
                const i64 cn = cnt[n];                                                          \
                for (i64 c = 0; c < C; c++) {                                                   \
                    double s1, s2;                                                              \
                    chunk_sums(ws, unit_bytes, n, chunks, C, c, &s1, &s2);                      \
                    double m = cn ? s1 / (double)cn : 0.0;                                      \
                    double v = cn ? s2 / (double)cn - m * m : 0.0;                              \
                    if (pass < two_pass) {                                                      \
                        shift[n * C + c] += m;                                                  \
                    } else {                                                                    \
                        mean[n * C + c] = (S)(shift[n * C + c] + m);                            \
                        var[n * C + c] = (S)(v < 0.0 ? 0.0 : v);                                \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        free(ws);                                                                               \
        return 0;                                                                               \
    }                                                                                           \
    NK_API int nk_moments_masked_##SFX(int nlc, const T *x, const uint8_t *mask, i64 N, i64 C,  \
                                       i64 L, S *count, S *mean, S *var, int nt) {              \
        nt = threads_for(N * C * L, nt);                                                        \
        int two_pass = sizeof(S) == sizeof(double);                                             \
        i64 *cnt = (i64 *)malloc(sizeof(i64) * (size_t)(N > 0 ? N : 1));                       \
        if (!cnt) return -1;                                                                    \
        for (i64 n = 0; n < N; n++) {                                                           \
            cnt[n] = count_valid(mask + n * L, L);                                              \
            count[n] = (S)cnt[n];                                                               \
        }                                                                                       \
        int code = 0;                                                                           \
        if (nlc)                                                                                \
            code = moments_masked_nlc_##SFX(x, mask, N, C, L, cnt, mean, var, two_pass, nt);    \
        else                                                                                    \
            code = moments_masked_ncl_##SFX(x, mask, N, C, L, cnt, mean, var, two_pass, nt);    \
        free(cnt);                                                                              \
        return code;                                                                            \
    }                                                                                           \
    /* y = valid ? (x - mu[n,c]) * scale[n,c] + shift[c] : 0 */                                 \
    NK_API int nk_apply_masked_##SFX(int nlc, const T *restrict x, const uint8_t *restrict mask, \
                                      T *restrict y, i64 N, i64 C, i64 L, const S *restrict mu, \
                                      const S *restrict sc, const S *restrict sh, int nt) {     \
        nt = threads_for(N * C * L, nt);                                                        \
        if (nlc) {                                                                              \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * L; r++) {                                                   \
                i64 n = r / L;                                                                  \
                const T *restrict xr = x + r * C;                                               \
                T *restrict yr = y + r * C;                                                     \
                if (!mask[r]) {                                                                 \
                    memset(yr, 0, sizeof(T) * (size_t)C); /* 0 in every element type */         \
                    continue;                                                                   \
                }                                                                               \
                const S *restrict m = mu + n * C, *restrict s = sc + n * C;                     \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) yr[c] =                         \
                    ST(((S)LD(xr[c]) - m[c]) * s[c] + sh[c]);                                   \
            }                                                                                   \
            return 0;                                                                           \
        }                                                                                       \
        MT *words = mask_words_##MT(mask, N * L);                                               \
        if (!words) return -1;                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")               \
        for (i64 r = 0; r < N * C; r++) {                                                       \
            const T *restrict xr = x + r * L;                                                   \
            const MT *restrict v = words + (r / C) * L;                                         \
            T *restrict yr = y + r * L;                                                         \
            const S m = mu[r], s = sc[r], b = sh[r % C];                                        \
            _Pragma("omp simd") for (i64 i = 0; i < L; i++) yr[i] =                             \
                ST(KEEP(((S)LD(xr[i]) - m) * s + b, v[i]));                                     \
        }                                                                                       \
        free(words);                                                                            \
        return 0;                                                                               \
    }                                                                                           \
    /* sums of dy and dy * (x - mean[n,c]) over the valid positions of each (n, c) */          \
    NK_API int nk_reduce_masked_##SFX(int nlc, const T *restrict dy, const T *restrict x,        \
                                      const uint8_t *restrict mask, i64 N, i64 C, i64 L,        \
                                      const S *restrict mean, S *sdy, S *sdyxc, int nt) {       \
        nt = threads_for(N * C * L, nt);                                                        \
        if (!nlc) {                                                                             \
            MT *words = mask_words_##MT(mask, N * L);                                           \
            if (!words) return -1;                                                              \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * C; r++) {                                                   \
                const T *restrict g = dy + r * L, *restrict xr = x + r * L;                     \
                const MT *restrict v = words + (r / C) * L;                                     \
                const S m = mean[r];                                                            \
                double s1 = 0.0, s2 = 0.0;                                                      \
                for (i64 i0 = 0; i0 < L; i0 += BLOCK) {                                         \
                    i64 i1 = i0 + BLOCK < L ? i0 + BLOCK : L;                                   \
                    S a = 0, b = 0;                                                             \
                    _Pragma("omp simd reduction(+ : a, b)") for (i64 i = i0; i < i1; i++) {     \
                        S gi = (S)LD(g[i]);                                                     \
                        S gx = gi * ((S)LD(xr[i]) - m);                                         \
                        a += KEEP(gi, v[i]);                                                    \
                        b += KEEP(gx, v[i]);                                                    \
                    }                                                                           \
                    s1 += (double)a;                                                            \
                    s2 += (double)b;                                                            \
                }                                                                               \
                sdy[r] = (S)s1;                                                                 \
                sdyxc[r] = (S)s2;                                                               \
            }                                                                                   \
            free(words);                                                                        \
            return 0;                                                                           \
        }                                                                                       \
        i64 chunks = nlc_chunks(N, L, nt), units = N * chunks;                                 \
        size_t unit_bytes = (size_t)C * (2 * sizeof(double) + 2 * sizeof(S));                   \
        char *ws = (char *)malloc(unit_bytes * (size_t)units);                                  \
        if (!ws) return -1;                                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")               \
        for (i64 u = 0; u < units; u++) {                                                       \
            i64 n = u / chunks, j = u % chunks;                                                 \
            i64 l0 = L * j / chunks, l1 = L * (j + 1) / chunks;                                 \
            double *restrict a = (double *)(ws + unit_bytes * (size_t)u), *restrict b = a + C;  \
            S *restrict fa = (S *)(b + C), *restrict fb = fa + C;                               \
            const S *restrict m = mean + n * C;                                                 \
            const uint8_t *mr = mask + n * L;                                                   \
            memset(a, 0, sizeof(double) * (size_t)(2 * C));                                    \
            for (i64 b0 = l0; b0 < l1; b0 += BLOCK) {                                           \
                i64 b1 = b0 + BLOCK < l1 ? b0 + BLOCK : l1;                                     \
                memset(fa, 0, sizeof(S) * (size_t)(2 * C));                                     \
                for (i64 l = b0; l < b1; l++) {                                                 \
                    if (!mr[l]) continue;                                                       \
                    const T *restrict g = dy + (n * L + l) * C, *restrict xr = x + (n * L + l) * C; \
                    _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                           \
                        S gi = (S)LD(g[c]);                                                     \
                        fa[c] += gi;                                                            \
                        fb[c] += gi * ((S)LD(xr[c]) - m[c]);                                    \
                    }                                                                           \
                }                                                                               \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                               \
                    a[c] += (double)fa[c];                                                      \
                    b[c] += (double)fb[c];                                                      \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (i64 n = 0; n < N; n++)                                                             \
            for (i64 c = 0; c < C; c++) {                                                       \
                double s1, s2;                                                                  \
                chunk_sums(ws, unit_bytes, n, chunks, C, c, &s1, &s2);                          \
                sdy[n * C + c] = (S)s1;                                                         \
                sdyxc[n * C + c] = (S)s2;                                                       \
            }                                                                                   \
        free(ws);                                                                               \
        return 0;                                                                               \
    }                                                                                           \
    /* dx = valid ? dy * scale[n,c] + (x - mean[n,c]) * q[n,c] + p[n,c] : 0 */                  \
    NK_API int nk_backward_apply_masked_##SFX(int nlc, const T *restrict dy, const T *restrict x, \
                                               const uint8_t *restrict mask, T *restrict dx,   \
                                               i64 N, i64 C, i64 L, const S *restrict mean,     \
                                               const S *restrict sc, const S *restrict p,       \
                                               const S *restrict q, int nt) {                   \
        nt = threads_for(N * C * L, nt);                                                        \
        if (nlc) {                                                                              \
            _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")           \
            for (i64 r = 0; r < N * L; r++) {                                                   \
                i64 o = (r / L) * C;                                                            \
                const T *restrict g = dy + r * C, *restrict xr = x + r * C;                     \
                T *restrict d = dx + r * C;                                                     \
                if (!mask[r]) {                                                                 \
                    memset(d, 0, sizeof(T) * (size_t)C);                                        \
                    continue;                                                                   \
                }                                                                               \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) d[c] =                          \
                    ST((S)LD(g[c]) * sc[o + c] + ((S)LD(xr[c]) - mean[o + c]) * q[o + c] +      \
                       p[o + c]);                                                               \
            }                                                                                   \
            return 0;                                                                           \
        }                                                                                       \
        MT *words = mask_words_##MT(mask, N * L);                                               \
        if (!words) return -1;                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt) if (nt > 1)")               \
        for (i64 r = 0; r < N * C; r++) {                                                       \
            const T *restrict g = dy + r * L, *restrict xr = x + r * L;                         \
            const MT *restrict v = words + (r / C) * L;                                         \
            T *restrict d = dx + r * L;                                                         \
            const S m = mean[r], s = sc[r], pp = p[r], qq = q[r];                               \
            _Pragma("omp simd") for (i64 i = 0; i < L; i++) d[i] =                              \
                ST(KEEP((S)LD(g[i]) * s + ((S)LD(xr[i]) - m) * qq + pp, v[i]));                 \
        }                                                                                       \
        free(words);                                                                            \
        return 0;                                                                               \
    }

DEFINE_MASKED_KERNELS(f32, float, float, LD_ID, ST_F32, uint32_t, keep_f)
DEFINE_MASKED_KERNELS(f64, double, double, LD_ID, ST_F64, uint64_t, keep_d)
DEFINE_MASKED_KERNELS(bf16, uint16_t, float, LD_BF16, ST_BF16, uint32_t, keep_f)
#if NK_HAS_HALF
DEFINE_MASKED_KERNELS(f16, half_t, float, LD_F16, ST_F16, uint32_t, keep_f)
#endif

NK_API int nk_has_half(void) { return NK_HAS_HALF; }

/* ---- the O(N*C) mixer ----------------------------------------------------------------
 * Sources (kind): 0 = IN (per n, c), 1 = LN (per n), 2 = BN (per c), 3 = GN (per n, group).
 * Every source's mean/var is an equal-count merge of the IN moments; a "constant" source
 * (BN in eval, or IN from running averages) reads running_mean/var and gets no gradient.
 * mu = sum_k wm_k mu_k, var = sum_k wv_k var_k with the caller's importance weights (K > 1),
 * scale = gamma / sqrt(max(var, 0) + eps), shift = beta. All arithmetic in double.
 * With softmax = 1 the caller passes logits in the statistics dtype instead of double weights
 * (Switchable Normalization's policy, computed here rather than by two framework ops per
 * direction), and the backward returns the logits' gradients in that dtype.
 */
#define MAX_SOURCES 16

/* The mixer's O(N*C) sums are in double, where rounding order is immaterial; letting the
   compiler reassociate them (this section only) turns latency-bound serial sums into SIMD. */
#pragma GCC push_options
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")

typedef struct {
    int kind;
    i64 groups, stride; /* GN: group count, channels per group */
    int constant;
    i64 size;           /* entries in m and v */
    double *m, *v;      /* the source's statistics: (N, C), (N), (C) or (N, groups) */
} source_t;

/* Run BODY for every (n, c) with i = n * C + c and j = the source's entry for (n, c); the
   switch on the kind sits outside the loops so that they stay simple. */
#define FOR_SOURCE(s, N, C, ...)                                                                \
    do {                                                                                        \
        switch ((s)->kind) {                                                                    \
        case 0:                                                                                 \
            for (i64 n = 0; n < (N); n++)                                                       \
                for (i64 c = 0; c < (C); c++) {                                                 \
                    i64 i = n * (C) + c, j = (s)->constant ? c : i;                             \
                    __VA_ARGS__                                                                 \
                }                                                                               \
            break;                                                                              \
        case 1:                                                                                 \
            for (i64 n = 0; n < (N); n++)                                                       \
                for (i64 c = 0; c < (C); c++) {                                                 \
                    i64 i = n * (C) + c, j = n;                                                 \
                    __VA_ARGS__                                                                 \
                }                                                                               \
            break;                                                                              \
        case 2:                                                                                 \
            for (i64 n = 0; n < (N); n++)                                                       \
                for (i64 c = 0; c < (C); c++) {                                                 \
                    i64 i = n * (C) + c, j = c;                                                 \
                    __VA_ARGS__                                                                 \
                }                                                                               \
            break;                                                                              \
        default:                                                                                \
            for (i64 n = 0; n < (N); n++)                                                       \
                for (i64 gi = 0; gi < (s)->groups; gi++)                                        \
                    for (i64 c = gi * (s)->stride; c < (gi + 1) * (s)->stride; c++) {           \
                        i64 i = n * (C) + c, j = n * (s)->groups + gi;                          \
                        __VA_ARGS__                                                             \
                    }                                                                           \
        }                                                                                       \
    } while (0)


static i64 source_size(int kind, int constant, i64 N, i64 C, i64 groups) {
    return kind == 0 ? (constant ? C : N * C) : kind == 1 ? N : kind == 2 ? C : N * groups;
}

/* v <- 1 / sqrt(v + eps), vectorised (needs -fno-math-errno for sqrt). Mixed batch variances
   are never negative; a negative or NaN running variance gives NaN, as in torch. */
static void rstd_in_place(double *restrict v, i64 n, double eps) {
#pragma omp simd
    for (i64 i = 0; i < n; i++) v[i] = 1.0 / sqrt(v[i] + eps);
}

/* Mixed mean and variance per (n, c): mu = sum_k wm_k m_k, var = sum_k wv_k v_k. */
static void mix(const source_t *src, int K, const double *wm, const double *wv, i64 N, i64 C,
                double *mu, double *var) {
    memset(mu, 0, sizeof(double) * (size_t)(N * C));
    memset(var, 0, sizeof(double) * (size_t)(N * C));
    for (int k = 0; k < K; k++) {
        const source_t *s = &src[k];
        const double a = wm[k], b = wv[k];
        FOR_SOURCE(s, N, C, mu[i] += a * s->m[j]; var[i] += b * s->v[j];);
    }
}

/* Fill each source's statistics from the IN moments (or the running ones). cnt: per-sample
   counts (masked inputs), NULL when every sample has L values. */
#define DEFINE_MIXER(SFX, S)                                                                    \
    static double total_count_##SFX(const S *cnt, i64 N) {                                      \
        double t = 0.0;                                                                         \
        for (i64 n = 0; n < N; n++) t += (double)cnt[n];                                        \
        return t;                                                                               \
    }                                                                                           \
    /* sample n's share of the batch (0 for every sample when the batch has no value) */       \
    static inline double share_##SFX(const S *cnt, i64 n, double tot) {                         \
        return tot > 0.0 ? (double)cnt[n] / tot : 0.0;                                          \
    }                                                                                           \
    static void build_sources_##SFX(i64 N, i64 C, int K, const int *kinds, const i64 *groups,   \
                                    const S *mean, const S *var, const S *rmean, const S *rvar,  \
                                    int const_mask, const S *cnt, source_t *src, double *pool) { \
        for (int k = 0; k < K; k++) {                                                           \
            source_t *s = &src[k];                                                              \
            s->kind = kinds[k];                                                                 \
            s->groups = s->kind == 3 ? groups[k] : 1;                                           \
            s->stride = s->kind == 3 ? C / groups[k] : 1;                                       \
            s->constant = (const_mask >> k) & 1;                                                \
            s->size = source_size(s->kind, s->constant, N, C, s->groups);                       \
            s->m = pool;                                                                        \
            s->v = pool + s->size;                                                              \
            pool += 2 * s->size;                                                                \
            if (s->constant) { /* running statistics, per channel */                            \
                for (i64 c = 0; c < C; c++) {                                                   \
                    s->m[c] = (double)rmean[c];                                                 \
                    s->v[c] = (double)rvar[c];                                                  \
                }                                                                               \
                continue;                                                                       \
            }                                                                                   \
            if (s->kind == 0) {                                                                 \
                for (i64 i = 0; i < N * C; i++) {                                               \
                    s->m[i] = (double)mean[i];                                                  \
                    s->v[i] = (double)var[i];                                                   \
                }                                                                               \
                continue;                                                                       \
            }                                                                                   \
            /* equal-count merge: mean of means, mean of (var + (mean - merged)^2) */           \
            memset(s->m, 0, sizeof(double) * (size_t)(2 * s->size));                            \
            const double inv = 1.0 / (double)(s->kind == 1 ? C : s->kind == 2 ? N : s->stride);  \
            if (s->kind == 1) { /* one sum per sample: in registers, not through memory */      \
                for (i64 n = 0; n < N; n++) {                                                   \
                    const S *mr = mean + n * C, *vr = var + n * C;                              \
                    double a = 0.0, b = 0.0;                                                    \
                    _Pragma("omp simd reduction(+ : a)") for (i64 c = 0; c < C; c++) a += (double)mr[c]; \
                    a *= inv;                                                                   \
                    _Pragma("omp simd reduction(+ : b)") for (i64 c = 0; c < C; c++) {         \
                        double d = (double)mr[c] - a;                                           \
                        b += (double)vr[c] + d * d;                                             \
                    }                                                                           \
                    s->m[n] = a;                                                                \
                    s->v[n] = b * inv;                                                          \
                }                                                                               \
                continue;                                                                       \
            }                                                                                   \
            if (s->kind == 2 && cnt) { /* samples of unequal counts (masks): weights n_i / n */  \
                const double tot = total_count_##SFX(cnt, N);                                    \
                FOR_SOURCE(s, N, C, s->m[j] += share_##SFX(cnt, n, tot) * (double)mean[i];);     \
                FOR_SOURCE(s, N, C, double d = (double)mean[i] - s->m[j];                       \
                           s->v[j] += share_##SFX(cnt, n, tot) * ((double)var[i] + d * d););    \
                continue;                                                                       \
            }                                                                                   \
            FOR_SOURCE(s, N, C, s->m[j] += (double)mean[i];);                                   \
            for (i64 j = 0; j < s->size; j++) s->m[j] *= inv;                                   \
            FOR_SOURCE(s, N, C, double d = (double)mean[i] - s->m[j];                           \
                       s->v[j] += (double)var[i] + d * d;);                                     \
            for (i64 j = 0; j < s->size; j++) s->v[j] *= inv;                                   \
        }                                                                                       \
    }                                                                                           \
    static i64 pool_size_##SFX(i64 N, i64 C, int K, const int *kinds, const i64 *groups) {      \
        i64 total = 0;                                                                          \
        for (int k = 0; k < K; k++) total += 2 * source_size(kinds[k], 0, N, C, groups[k]);     \
        return total;                                                                           \
    }                                                                                           \
    /* softmax of K logits, as torch computes it: exp(l - max) / sum */                      \
    static void softmax_##SFX(int K, const S *logits, double *w) {                              \
        double top = (double)logits[0], total = 0.0;                                            \
        for (int k = 1; k < K; k++) top = (double)logits[k] > top ? (double)logits[k] : top;    \
        for (int k = 0; k < K; k++) total += w[k] = exp((double)logits[k] - top);               \
        for (int k = 0; k < K; k++) w[k] /= total;                                              \
    }                                                                                           \
    /* importance weights (K > 1; one source has weight 1): the caller's double weights, or     \
     * with softmax the softmax of its logits of dtype S */                                     \
    static void weights_##SFX(int K, int softmax, const void *mw, const void *vw, double *wm,   \
                              double *wv) {                                                     \
        if (K > 1 && softmax) {                                                                 \
            softmax_##SFX(K, (const S *)mw, wm);                                                \
            softmax_##SFX(K, (const S *)vw, wv);                                                \
            return;                                                                             \
        }                                                                                       \
        for (int k = 0; k < K; k++) {                                                           \
            wm[k] = K == 1 ? 1.0 : ((const double *)mw)[k];                                     \
            wv[k] = K == 1 ? 1.0 : ((const double *)vw)[k];                                     \
        }                                                                                       \
    }                                                                                           \
    /* the weights' gradients g (double) written out: as they are, or through the softmax      \
     * (dl_k = w_k (g_k - sum_j w_j g_j)) in dtype S */                                         \
    static void weight_grads_##SFX(int K, int softmax, const double *w, const double *g,        \
                                   void *out) {                                                 \
        if (!out) return;                                                                       \
        if (!softmax) {                                                                         \
            for (int k = 0; k < K; k++) ((double *)out)[k] = g[k];                              \
            return;                                                                             \
        }                                                                                       \
        double dot = 0.0;                                                                       \
        for (int k = 0; k < K; k++) dot += w[k] * g[k];                                         \
        for (int k = 0; k < K; k++) ((S *)out)[k] = (S)(w[k] * (g[k] - dot));                   \
    }                                                                                           \
    /* Batch Renorm (Ioffe 2017): r = clip(sigma_B / sigma, 1/rmax, rmax), d = clip((mu_B - mu)  \
     * / sigma, -dmax, dmax) from the running mu, sigma = sqrt(running_var + eps); scale =      \
     * gamma r / sigma_B, shift = beta + gamma d. NaN passes every clip, as in torch. */         \
    static void renorm_fold_##SFX(const double *bmean, const double *rstd, i64 N, i64 C,        \
                                  const S *rmean, const S *rvar, const S *gamma, const S *beta,  \
                                  double eps, const double *renorm, S *scale, S *shift, S *rd) { \
        const double rmax = renorm[0], rmin = 1.0 / renorm[0], dmax = renorm[1];                \
        for (i64 c = 0; c < C; c++) {                                                           \
            double rv = (double)rvar[c];                                                        \
            rv = rv < 0.0 ? 0.0 : rv;                                                           \
            const double sigma = sqrt(rv + eps), g = gamma ? (double)gamma[c] : 1.0;            \
            double r = 1.0 / (rstd[c] * sigma), d = (bmean[c] - (double)rmean[c]) / sigma;      \
            r = r < rmin ? rmin : (r > rmax ? rmax : r);                                        \
            d = d < -dmax ? -dmax : (d > dmax ? dmax : d);                                      \
            rd[c] = (S)r;                                                                       \
            rd[C + c] = (S)d;                                                                   \
            shift[c] = (S)((beta ? (double)beta[c] : 0.0) + g * (double)(S)d);                  \
            for (i64 n = 0; n < N; n++) scale[n * C + c] = (S)(rstd[n * C + c] * g * (double)(S)r); \
        }                                                                                       \
    }                                                                                           \
    /* Forward: mu, scale (N, C), shift (C), and the BN source's batch statistics (C). */       \
    NK_API int nk_mix_forward_##SFX(i64 N, i64 C, int K, const int *kinds, const i64 *groups,   \
                                    int const_mask, int softmax, const S *mean, const S *var,   \
                                    const void *mw, const void *vw, const S *rmean,             \
                                    const S *rvar, const S *gamma, const S *beta, double eps,   \
                                    const double *renorm, const S *cnt, S *mu, S *scale,        \
                                    S *shift, S *bn_mean, S *bn_var, S *rd) {                   \
        if (K < 1 || K > MAX_SOURCES) return -2;                                                \
        source_t src[MAX_SOURCES];                                                              \
        double wm[MAX_SOURCES], wv[MAX_SOURCES];                                                \
        i64 psize = pool_size_##SFX(N, C, K, kinds, groups);                                    \
        double *pool = (double *)malloc(sizeof(double) * (size_t)(psize + 2 * N * C));          \
        if (!pool) return -1;                                                                   \
        double *m = pool + psize, *v = m + N * C;                                               \
        build_sources_##SFX(N, C, K, kinds, groups, mean, var, rmean, rvar, const_mask, cnt, src, pool); \
        weights_##SFX(K, softmax, mw, vw, wm, wv);                                              \
        mix(src, K, wm, wv, N, C, m, v);                                                        \
        rstd_in_place(v, N * C, eps);                                                           \
        if (renorm) { /* Batch Renorm: one BN source (the operator checks) */                \
            renorm_fold_##SFX(src[0].m, v, N, C, rmean, rvar, gamma, beta, eps, renorm, scale, shift, rd); \
            for (i64 i = 0; i < N * C; i++) mu[i] = (S)m[i];                                    \
            for (i64 c = 0; c < C; c++) {                                                       \
                bn_mean[c] = (S)src[0].m[c];                                                    \
                bn_var[c] = (S)src[0].v[c];                                                     \
            }                                                                                   \
            free(pool);                                                                         \
            return 0;                                                                           \
        }                                                                                       \
        for (i64 n = 0; n < N; n++) {                                                           \
            const double *r = v + n * C;                                                        \
            S *sc = scale + n * C;                                                              \
            if (gamma) {                                                                        \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) sc[c] = (S)(r[c] * (double)gamma[c]); \
            } else {                                                                            \
                _Pragma("omp simd") for (i64 c = 0; c < C; c++) sc[c] = (S)r[c];                \
            }                                                                                   \
        }                                                                                       \
        for (i64 i = 0; i < N * C; i++) mu[i] = (S)m[i];                                        \
        for (i64 c = 0; c < C; c++) shift[c] = beta ? beta[c] : (S)0;                           \
        int batch_written = 0;                                                                  \
        for (int k = 0; k < K; k++)                                                             \
            if (src[k].kind == 2 && !src[k].constant && bn_mean) {                              \
                batch_written = 1;                                                              \
                for (i64 c = 0; c < C; c++) {                                                   \
                    bn_mean[c] = (S)src[k].m[c];                                                \
                    bn_var[c] = (S)src[k].v[c];                                                 \
                }                                                                               \
            }                                                                                   \
        if (!batch_written && bn_mean) { /* no batch statistics: the output stays defined */    \
            memset(bn_mean, 0, sizeof(S) * (size_t)C);                                          \
            memset(bn_var, 0, sizeof(S) * (size_t)C);                                           \
        }                                                                                       \
        free(pool);                                                                             \
        return 0;                                                                               \
    }                                                                                           \
    /* Backward from A = sum(dy), B = sum(dy * (x - mean)) per (n, c): p, q for the dx pass     \
     * (dx = dy * scale + (x - mean) * q + p), and the gradients of gamma, beta and logits. */  \
    NK_API int nk_mix_backward_##SFX(i64 N, i64 C, i64 L, int K, const int *kinds,              \
                                     const i64 *groups, int const_mask, int softmax,            \
                                     const S *mean, const S *var, const void *mw,               \
                                     const void *vw, const S *rmean, const S *rvar,             \
                                     const S *gamma, double eps, const S *A, const S *B,        \
                                     const S *rd, const S *cnt, S *p, S *q, S *dgamma,          \
                                     S *dbeta, void *dmw, void *dvw) {                          \
        if (K < 1 || K > MAX_SOURCES) return -2;                                                \
        source_t src[MAX_SOURCES];                                                              \
        double wm[MAX_SOURCES], wv[MAX_SOURCES];                                                \
        i64 psize = pool_size_##SFX(N, C, K, kinds, groups), nc = N * C;                        \
        /* pool: sources | m, v, Gm, Gv, gmean, gvar (N*C each) | dg, db (C) | sums (<= psize) */ \
        double *pool = (double *)malloc(sizeof(double) * (size_t)(2 * psize + 6 * nc + 2 * C)); \
        if (!pool) return -1;                                                                   \
        build_sources_##SFX(N, C, K, kinds, groups, mean, var, rmean, rvar, const_mask, cnt, src, pool); \
        double *m = pool + psize, *v = m + nc, *Gm = v + nc, *Gv = Gm + nc;                     \
        double *gmean = Gv + nc, *gvar = gmean + nc, *dg = gvar + nc, *db = dg + C;             \
        double *sums = db + C;                                                                  \
        weights_##SFX(K, softmax, mw, vw, wm, wv);                                              \
        mix(src, K, wm, wv, N, C, m, v);                                                        \
        for (i64 i = 0; i < nc; i++) Gv[i] = 1.0;                                               \
        rstd_in_place(v, nc, eps);                                                              \
        memset(dg, 0, sizeof(double) * (size_t)(2 * C));                                        \
        for (i64 n = 0; n < N; n++) {                                                           \
            _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                                   \
                i64 i = n * C + c;                                                              \
                double r = v[i], g = (gamma ? (double)gamma[c] : 1.0) * (rd ? (double)rd[c] : 1.0); \
                double a = (double)A[i];                                                        \
                double dscale = (double)B[i] + a * ((double)mean[i] - m[i]);                    \
                dg[c] += dscale * r;                                                            \
                db[c] += a;                                                                     \
                Gm[i] = -g * r * a;                                                             \
                Gv[i] *= -0.5 * dscale * g * r * r * r;                                         \
            }                                                                                   \
        }                                                                                       \
        for (i64 c = 0; c < C; c++) { /* renorm: d/dgamma of gamma (r xhat + d) */              \
            if (dgamma) dgamma[c] = (S)(rd ? (double)rd[c] * dg[c] + (double)rd[C + c] * db[c] : dg[c]); \
            if (dbeta) dbeta[c] = (S)db[c];                                                     \
        }                                                                                       \
        if (K > 1) { /* d/dw_k = sum Gm * m_k (and likewise for the variance weights) */        \
            double gm[MAX_SOURCES], gv[MAX_SOURCES];                                            \
            for (int k = 0; k < K; k++) {                                                       \
                const source_t *s = &src[k];                                                    \
                double tm = 0.0, tv = 0.0;                                                      \
                FOR_SOURCE(s, N, C, tm += Gm[i] * s->m[j]; tv += Gv[i] * s->v[j];);             \
                gm[k] = tm;                                                                     \
                gv[k] = tv;                                                                     \
            }                                                                                   \
            weight_grads_##SFX(K, softmax, wm, gm, dmw);                                        \
            weight_grads_##SFX(K, softmax, wv, gv, dvw);                                        \
        }                                                                                       \
        memset(gmean, 0, sizeof(double) * (size_t)(2 * nc));                                    \
        for (int k = 0; k < K; k++) {                                                           \
            const source_t *s = &src[k];                                                        \
            const double a = wm[k], b = wv[k];                                                  \
            if (s->constant) continue;                                                          \
            if (s->kind == 0) {                                                                 \
                for (i64 i = 0; i < nc; i++) {                                                  \
                    gmean[i] += a * Gm[i];                                                      \
                    gvar[i] += b * Gv[i];                                                       \
                }                                                                               \
                continue;                                                                       \
            }                                                                                   \
            /* merged source over M members: d m_k/d mean = 1/M, d v_k/d var = 1/M,             \
               d v_k/d mean = 2 (mean - m_k) / M */                                             \
            const double inv = 1.0 / (double)(s->kind == 1 ? C : s->kind == 2 ? N : s->stride);  \
            double *sm = sums, *sv = sums + s->size;                                            \
            memset(sums, 0, sizeof(double) * (size_t)(2 * s->size));                            \
            if (s->kind == 1) { /* one sum per sample: in registers, not through memory */      \
                for (i64 n = 0; n < N; n++) {                                                   \
                    double a1 = 0.0, a2 = 0.0;                                                  \
                    const double *gm = Gm + n * C, *gv = Gv + n * C;                            \
                    _Pragma("omp simd reduction(+ : a1, a2)") for (i64 c = 0; c < C; c++) {    \
                        a1 += gm[c];                                                            \
                        a2 += gv[c];                                                            \
                    }                                                                           \
                    sm[n] = a1;                                                                 \
                    sv[n] = a2;                                                                 \
                }                                                                               \
            } else {                                                                            \
                FOR_SOURCE(s, N, C, sm[j] += Gm[i]; sv[j] += Gv[i];);                           \
            }                                                                                   \
            if (s->kind == 2 && cnt) { /* unequal counts: member n weighs n_i / n, not 1/N */    \
                const double tot = total_count_##SFX(cnt, N);                                    \
                FOR_SOURCE(s, N, C, const double w = share_##SFX(cnt, n, tot);                  \
                           gmean[i] += w * (a * sm[j] + 2.0 * b * sv[j] * ((double)mean[i] - s->m[j])); \
                           gvar[i] += w * b * sv[j];);                                          \
                continue;                                                                       \
            }                                                                                   \
            for (i64 j = 0; j < s->size; j++) {                                                 \
                sm[j] *= a * inv;                                                               \
                sv[j] *= b * inv;                                                               \
            }                                                                                   \
            FOR_SOURCE(s, N, C, gmean[i] += sm[j] + 2.0 * sv[j] * ((double)mean[i] - s->m[j]);  \
                       gvar[i] += sv[j];);                                                      \
        }                                                                                       \
        for (i64 n = 0; n < N; n++) { /* per value of each (n, c): 1 / L, or 1 / n_i masked */  \
            const double inv_len = cnt ? ((double)cnt[n] > 0.0 ? 1.0 / (double)cnt[n] : 0.0)    \
                                       : 1.0 / (double)L;                                       \
            for (i64 c = 0; c < C; c++) {                                                       \
                const i64 i = n * C + c;                                                        \
                p[i] = (S)(gmean[i] * inv_len);                                                 \
                q[i] = (S)(2.0 * gvar[i] * inv_len);                                            \
            }                                                                                   \
        }                                                                                       \
        free(pool);                                                                             \
        return 0;                                                                               \
    }

DEFINE_MIXER(f32, float)
DEFINE_MIXER(f64, double)
#pragma GCC pop_options

/* ---- running statistics ---------------------------------------------------------------
 * PyTorch's convention: r += momentum * (batch - r), with the unbiased batch variance.
 * BN source (per_sample = 0): mean/var are (C) over count = N*L values. IN source
 * (per_sample = 1): mean/var are (N, C) over L values each, averaged over the samples, as
 * torch.nn.InstanceNorm*d does. Nothing moves when a statistic saw at most one value.
 */
#define DEFINE_RUNNING(SFX, S)                                                                  \
    NK_API void nk_update_running_##SFX(i64 N, i64 C, i64 count, int per_sample, const S *mean, \
                                        const S *var, double momentum, S *rmean, S *rvar) {     \
        if (count <= 1) return;                                                                 \
        double unbias = (double)count / (double)(count - 1);                                    \
        i64 rows = per_sample ? N : 1;                                                          \
        for (i64 c = 0; c < C; c++) {                                                           \
            double m = 0.0, v = 0.0;                                                            \
            for (i64 n = 0; n < rows; n++) {                                                    \
                m += (double)mean[n * C + c];                                                   \
                v += (double)var[n * C + c];                                                    \
            }                                                                                   \
            m /= (double)rows;                                                                  \
            v = v / (double)rows * unbias;                                                      \
            rmean[c] = (S)((double)rmean[c] + momentum * (m - (double)rmean[c]));               \
            rvar[c] = (S)((double)rvar[c] + momentum * (v - (double)rvar[c]));                  \
        }                                                                                       \
    }

DEFINE_RUNNING(f32, float)
DEFINE_RUNNING(f64, double)

/* Batch Renorm's running statistics (Ioffe 2017, Algorithm 1): mu += momentum (mu_B - mu),
 * sigma += momentum (sigma_B - sigma) with sigma = sqrt(running_var + eps) and sigma_B =
 * sqrt(var_B + eps) (biased), stored back as running_var = max(sigma^2 - eps, 0). Nothing
 * moves when the batch had at most one value per channel. */
#define DEFINE_RENORM_RUNNING(SFX, S)                                                           \
    NK_API void nk_update_renorm_##SFX(i64 C, i64 count, const S *mean, const S *var,           \
                                       double momentum, double eps, S *rmean, S *rvar) {        \
        if (count <= 1) return;                                                                 \
        for (i64 c = 0; c < C; c++) {                                                           \
            double rv = (double)rvar[c];                                                        \
            rv = rv < 0.0 ? 0.0 : rv;                                                           \
            const double sigma = sqrt(rv + eps), sigma_b = sqrt((double)var[c] + eps);          \
            const double s = sigma + momentum * (sigma_b - sigma), v = s * s - eps;             \
            rmean[c] = (S)((double)rmean[c] + momentum * ((double)mean[c] - (double)rmean[c])); \
            rvar[c] = (S)(v < 0.0 ? 0.0 : v);                                                   \
        }                                                                                       \
    }

DEFINE_RENORM_RUNNING(f32, float)
DEFINE_RENORM_RUNNING(f64, double)

/* ---- whole layer in one call per direction ---------------------------------------------
 * Forward: moments (unless every statistic is a running one), mixer, apply; backward:
 * reduce, mixer backward, dx. One foreign call per direction keeps the per-layer overhead
 * at a few microseconds. stats holds mean, var, mu, scale (N*C each), then shift, batch
 * mean, batch var (C each), from which nk_update_running_* moves the running averages.
 */
#define DEFINE_LAYER(SFX, T, S, MS)                                                             \
    NK_API int nk_layer_forward_##SFX(int nlc, const T *x, T *y, i64 N, i64 C, i64 L, int K,    \
                                      const int *kinds, const i64 *groups, int const_mask,      \
                                      int softmax, int need_moments, S *stats, const void *ml,  \
                                      const void *vl,                                           \
                                      const S *rm, const S *rv, const S *w, const S *b,         \
                                      double eps, const double *renorm, int nt) {               \
        const i64 nc = N * C;                                                                   \
        S *mean = stats, *var = stats + nc, *mu = var + nc, *scale = mu + nc;                   \
        S *shift = scale + nc, *bn_mean = shift + C, *bn_var = bn_mean + C, *rd = bn_var + C;   \
        int code = 0;                                                                           \
        if (need_moments) {                                                                     \
            code = nk_moments_##SFX(nlc, x, N, C, L, mean, var, nt);                            \
            if (code) return code;                                                              \
        } else {                                                                                \
            memset(stats, 0, sizeof(S) * (size_t)(2 * nc));                                    \
        }                                                                                       \
        code = nk_mix_forward_##MS(N, C, K, kinds, groups, const_mask, softmax, mean, var, ml, vl, rm, \
                                   rv, w, b, eps, renorm, NULL, mu, scale, shift, bn_mean, bn_var, \
                                   renorm ? rd : NULL);                                         \
        if (code) return code;                                                                  \
        nk_apply_##SFX(nlc, x, y, N, C, L, mu, scale, shift, nt);                               \
        return 0;                                                                               \
    }                                                                                           \
    NK_API int nk_layer_backward_##SFX(int nlc, const T *dy, const T *x, T *dx, i64 N, i64 C,   \
                                       i64 L, int K, const int *kinds, const i64 *groups,       \
                                       int const_mask, int softmax, const S *stats,             \
                                       const void *ml, const void *vl, const S *rm,             \
                                       const S *rv, const S *w, double eps, int renorm,         \
                                       S *dgamma, S *dbeta, void *dml, void *dvl, int nt) {     \
        const i64 nc = N * C;                                                                   \
        const S *mean = stats, *var = stats + nc, *scale = stats + 3 * nc;                      \
        const S *rd = renorm ? stats + 4 * nc + 3 * C : NULL;                                   \
        S *work = (S *)malloc(sizeof(S) * (size_t)(4 * nc));                                    \
        if (!work) return -1;                                                                   \
        S *A = work, *B = A + nc, *p = B + nc, *q = p + nc;                                     \
        int code = nk_reduce_##SFX(nlc, dy, x, N, C, L, mean, A, B, nt);                        \
        if (!code)                                                                              \
            code = nk_mix_backward_##MS(N, C, L, K, kinds, groups, const_mask, softmax, mean, var, ml, \
                                        vl, rm, rv, w, eps, A, B, rd, NULL, p, q, dgamma, dbeta, dml, dvl); \
        if (!code && dx) nk_backward_apply_##SFX(nlc, dy, x, dx, N, C, L, mean, scale, p, q, nt); \
        free(work);                                                                             \
        return code;                                                                            \
    }

/* ---- the masked layer in one call per direction ------------------------------------------
 * The masked passes around the mixer, which weighs the batch merge by each sample's valid
 * count. stats as for the unmasked layer (with Batch Renorm's r, d), then the per-sample
 * valid counts (N); *valid_total receives their sum (the running update's count).
 */
#define DEFINE_MASKED_LAYER(SFX, T, S, MS)                                                      \
    NK_API int nk_layer_forward_masked_##SFX(int nlc, const T *x, const uint8_t *mask, T *y,    \
                                             i64 N, i64 C, i64 L, int K, const int *kinds,      \
                                             const i64 *groups, int const_mask, int softmax,    \
                                             S *stats, const void *ml, const void *vl,          \
                                             const S *rm, const S *rv, const S *w, const S *b,  \
                                             double eps, const double *renorm, i64 *valid_total, \
                                             int nt) {                                          \
        const i64 nc = N * C;                                                                   \
        S *mean = stats, *var = stats + nc, *mu = var + nc, *scale = mu + nc;                   \
        S *shift = scale + nc, *bn_mean = shift + C, *bn_var = bn_mean + C, *rd = bn_var + C;   \
        S *count = rd + (renorm ? 2 * C : 0);                                                   \
        int code = nk_moments_masked_##SFX(nlc, x, mask, N, C, L, count, mean, var, nt);       \
        if (code) return code;                                                                  \
        double total = 0.0;                                                                     \
        for (i64 n = 0; n < N; n++) total += (double)count[n];                                  \
        *valid_total = (i64)total;                                                              \
        code = nk_mix_forward_##MS(N, C, K, kinds, groups, const_mask, softmax, mean, var, ml, vl, rm, \
                                   rv, w, b, eps, renorm, count, mu, scale, shift, bn_mean,     \
                                   bn_var, renorm ? rd : NULL);                                 \
        if (code) return code;                                                                  \
        return nk_apply_masked_##SFX(nlc, x, mask, y, N, C, L, mu, scale, shift, nt);           \
    }                                                                                           \
    NK_API int nk_layer_backward_masked_##SFX(int nlc, const T *dy, const T *x,                 \
                                              const uint8_t *mask, T *dx, i64 N, i64 C, i64 L,  \
                                              int K, const int *kinds, const i64 *groups,       \
                                              int const_mask, int softmax, const S *stats,      \
                                              const void *ml, const void *vl, const S *rm,      \
                                              const S *rv, const S *w, double eps, int renorm,  \
                                              S *dgamma, S *dbeta, void *dml, void *dvl, int nt) { \
        const i64 nc = N * C;                                                                   \
        const S *mean = stats, *var = stats + nc, *scale = stats + 3 * nc;                      \
        const S *rd = renorm ? stats + 4 * nc + 3 * C : NULL;                                   \
        const S *count = stats + 4 * nc + (renorm ? 5 : 3) * C;                                 \
        S *work = (S *)malloc(sizeof(S) * (size_t)(4 * nc));                                    \
        if (!work) return -1;                                                                   \
        S *A = work, *B = A + nc, *p = B + nc, *q = p + nc;                                     \
        int code = nk_reduce_masked_##SFX(nlc, dy, x, mask, N, C, L, mean, A, B, nt);           \
        if (!code) /* L = 1: the mixer divides by each sample's count */                        \
            code = nk_mix_backward_##MS(N, C, 1, K, kinds, groups, const_mask, softmax, mean, var, ml, \
                                        vl, rm, rv, w, eps, A, B, rd, count, p, q, dgamma, dbeta, \
                                        dml, dvl);                                              \
        if (!code && dx)                                                                        \
            code = nk_backward_apply_masked_##SFX(nlc, dy, x, mask, dx, N, C, L, mean, scale, p, q, nt); \
        free(work);                                                                             \
        return code;                                                                            \
    }

DEFINE_LAYER(f32, float, float, f32)
DEFINE_LAYER(f64, double, double, f64)
DEFINE_LAYER(bf16, uint16_t, float, f32)
#if NK_HAS_HALF
DEFINE_LAYER(f16, half_t, float, f32)
#endif

DEFINE_MASKED_LAYER(f32, float, float, f32)
DEFINE_MASKED_LAYER(f64, double, double, f64)
DEFINE_MASKED_LAYER(bf16, uint16_t, float, f32)
#if NK_HAS_HALF
DEFINE_MASKED_LAYER(f16, half_t, float, f32)
#endif
