/* Weight-only bf16 matmul for CPU decoding: y (M, N) fp32 = x (M, K) fp32 @ w (N, K)^T, w stored as bfloat16.
 *
 * Why: a decode step reads every weight it uses once per token, so its speed is bytes / bandwidth. Official MiMo
 * checkpoints are bf16 (or FP8); keeping them in bf16 halves the bytes of an fp32 copy, and converting bf16 to fp32
 * is exact (a 16-bit shift), so the result equals the fp32 matmul of the same weights up to summation order.
 * torch on a CPU without native bf16 instructions runs bf16 matmuls on bf16-rounded *activations* and slowly for
 * a few rows; this kernel keeps activations and accumulation in fp32.
 *
 * Layout: w row-major (N, K), as nn.Linear stores it; x and y row-major with row strides ldx / ldy.
 * M <= 2 (decode of one or two sequences, an expert with 1-2 tokens): each bf16 vector is converted in registers
 * and used at once, with a software prefetch of the rows ahead. M > 2: pairs of weight rows converted in
 * registers against blocks of up to 6 x rows (gemm_big_m); an earlier form converted 3 rows into an fp32 buffer
 * for 4 x 3 blocks and fell to one-row dot products for M % 4 rows (M = 3 took 8x the time of M = 4; an expert
 * with 3 tokens is common in a batch). Products are split by rows over the pool's threads with the other products
 * of their group (mf_gemm_group, below).
 * The AVX2+FMA path is chosen at run time (__builtin_cpu_supports), so one binary is safe on any x86-64; other
 * machines get the portable loop. Built and loaded by mimoflash/kernels/__init__.py; tested against
 * F.linear(x, w.float()) in tests/test_kernels.py.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mimoflash_kernels.h"          /* every kernel's prototype */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void gemm_portable(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long N, long K) {
    for (long m = 0; m < M; m++)
        for (long n = 0; n < N; n++) {
            const uint16_t *wr = w + n * K;
            const float *xr = x + m * ldx;
            float acc = 0.f;
            for (long k = 0; k < K; k++) acc += xr[k] * bf16_to_f32(wr[k]);
            y[m * ldy + n] = acc;
        }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#ifndef PF_ROWS
#define PF_ROWS 4       /* software prefetch distance in weight rows (one 64-byte line per 8 weights consumed) */
#endif

AVX2 static inline __m256 load_bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One x row against one weight row; the tail (K % 8) in scalar code. */
AVX2 static float dot_row(const float *xr, const uint16_t *wr, long K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), load_bf16x8(wr + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8), load_bf16x8(wr + k + 8), a1);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), load_bf16x8(wr + k), a0);
    float acc = hsum(_mm256_add_ps(a0, a1));
    for (; k < K; k++) acc += xr[k] * bf16_to_f32(wr[k]);
    return acc;
}

/* M <= 2: four weight rows at a time, converted in registers, against each of the (one or two) x rows. */
AVX2 static void gemm_small_m(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long N,
                              long K) {
    long K8 = K & ~7L, n = 0;
    for (; n + 4 <= N; n += 4) {
        const uint16_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        if (M == 1) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long k = 0; k < K8; k += 8) {
                _mm_prefetch((const char *)(w0 + PF_ROWS * K) + 8 * k, _MM_HINT_T0);
                __m256 xv = _mm256_loadu_ps(x + k);
                a0 = _mm256_fmadd_ps(xv, load_bf16x8(w0 + k), a0);
                a1 = _mm256_fmadd_ps(xv, load_bf16x8(w1 + k), a1);
                a2 = _mm256_fmadd_ps(xv, load_bf16x8(w2 + k), a2);
                a3 = _mm256_fmadd_ps(xv, load_bf16x8(w3 + k), a3);
            }
            float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            for (long k = K8; k < K; k++) {
                r[0] += x[k] * bf16_to_f32(w0[k]); r[1] += x[k] * bf16_to_f32(w1[k]);
                r[2] += x[k] * bf16_to_f32(w2[k]); r[3] += x[k] * bf16_to_f32(w3[k]);
            }
            memcpy(y + n, r, sizeof r);
        } else {                                    /* M == 2 */
            const float *x1 = x + ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (long k = 0; k < K8; k += 8) {
                _mm_prefetch((const char *)(w0 + PF_ROWS * K) + 8 * k, _MM_HINT_T0);
                __m256 xv = _mm256_loadu_ps(x + k), xu = _mm256_loadu_ps(x1 + k);
                __m256 v0 = load_bf16x8(w0 + k), v1 = load_bf16x8(w1 + k);
                __m256 v2 = load_bf16x8(w2 + k), v3 = load_bf16x8(w3 + k);
                a0 = _mm256_fmadd_ps(xv, v0, a0); b0 = _mm256_fmadd_ps(xu, v0, b0);
                a1 = _mm256_fmadd_ps(xv, v1, a1); b1 = _mm256_fmadd_ps(xu, v1, b1);
                a2 = _mm256_fmadd_ps(xv, v2, a2); b2 = _mm256_fmadd_ps(xu, v2, b2);
                a3 = _mm256_fmadd_ps(xv, v3, a3); b3 = _mm256_fmadd_ps(xu, v3, b3);
            }
            float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            float s[4] = {hsum(b0), hsum(b1), hsum(b2), hsum(b3)};
            for (long k = K8; k < K; k++) {
                float u0 = bf16_to_f32(w0[k]), u1 = bf16_to_f32(w1[k]), u2 = bf16_to_f32(w2[k]),
                      u3 = bf16_to_f32(w3[k]);
                r[0] += x[k] * u0; r[1] += x[k] * u1; r[2] += x[k] * u2; r[3] += x[k] * u3;
                s[0] += x1[k] * u0; s[1] += x1[k] * u1; s[2] += x1[k] * u2; s[3] += x1[k] * u3;
            }
            memcpy(y + n, r, sizeof r);
            memcpy(y + ldy + n, s, sizeof s);
        }
    }
    for (; n < N; n++)
        for (long m = 0; m < M; m++) y[m * ldy + n] = dot_row(x + m * ldx, w + n * K, K);
}

/* M > 2: blocks of up to 6 x rows against 2 weight rows (12 accumulators, 2 conversions + 6 loads per 12 FMAs),
 * converted in registers like the M <= 2 path. The pair of weight rows (4 KB at K = 1024) stays in L1 while every
 * block of x rows runs against it, so each weight is read from memory once per call; the conversion (2 integer ops
 * per 8 weights) is repeated per block, which costs less than writing and re-reading an fp32 copy. MB is a
 * compile-time constant in each instantiation, so the accumulator array lives in registers. */
#define ROWS_X_2(MB)                                                                                                  \
    AVX2 static void rows##MB##_x2(const float *x, long ldx, const uint16_t *w0, long K, float *y, long ldy,      \
                                   int prefetch) {                                                                 \
        const uint16_t *w1 = w0 + K;                                                                               \
        long K8 = K & ~7L;                                                                                         \
        __m256 a[MB][2];                                                                                           \
        for (int m = 0; m < MB; m++) a[m][0] = a[m][1] = _mm256_setzero_ps();                                      \
        for (long k = 0; k < K8; k += 8) {                                                                         \
            if (prefetch) _mm_prefetch((const char *)(w0 + PF_ROWS * K) + 4 * k, _MM_HINT_T0);                  \
            __m256 v0 = load_bf16x8(w0 + k), v1 = load_bf16x8(w1 + k);                                             \
            for (int m = 0; m < MB; m++) {                                                                         \
                __m256 xv = _mm256_loadu_ps(x + m * ldx + k);                                                      \
                __asm__("" : "+x"(xv));         /* one load for both FMAs (else 14 loads per 12 FMAs) */          \
                a[m][0] = _mm256_fmadd_ps(xv, v0, a[m][0]);                                                        \
                a[m][1] = _mm256_fmadd_ps(xv, v1, a[m][1]);                                                        \
            }                                                                                                      \
        }                                                                                                          \
        for (int m = 0; m < MB; m++) {                                                                             \
            float r0 = hsum(a[m][0]), r1 = hsum(a[m][1]);                                                          \
            for (long k = K8; k < K; k++) {                                                                        \
                r0 += x[m * ldx + k] * bf16_to_f32(w0[k]);                                                         \
                r1 += x[m * ldx + k] * bf16_to_f32(w1[k]);                                                         \
            }                                                                                                      \
            y[m * ldy] = r0;                                                                                       \
            y[m * ldy + 1] = r1;                                                                                   \
        }                                                                                                          \
    }
ROWS_X_2(1)
ROWS_X_2(2)
ROWS_X_2(3)
ROWS_X_2(4)
ROWS_X_2(5)
ROWS_X_2(6)

/* Loop order: chunks of R weight rows (about 16 KB of bf16), then blocks of 6 x rows, then the row pairs of the
 * chunk. With the row pairs outermost, every pair re-read all M x rows (M = 16, K = 512: 32 KB, the whole L1) from
 * L2 for 2 KB of weights, and L2 bandwidth capped the kernel at about half the FMA peak; now a block of x rows stays
 * in L1 across the chunk and the chunk is re-read from L1/L2 once per block. */
AVX2 static void rows_x2(const float *xm, long ldx, const uint16_t *wn, long K, float *ym, long ldy, long mb,
                         int pf) {
    switch (mb) {
    case 6: rows6_x2(xm, ldx, wn, K, ym, ldy, pf); break;
    case 5: rows5_x2(xm, ldx, wn, K, ym, ldy, pf); break;
    case 4: rows4_x2(xm, ldx, wn, K, ym, ldy, pf); break;
    case 3: rows3_x2(xm, ldx, wn, K, ym, ldy, pf); break;
    case 2: rows2_x2(xm, ldx, wn, K, ym, ldy, pf); break;
    case 1: rows1_x2(xm, ldx, wn, K, ym, ldy, pf); break;
    default: break;
    }
}

AVX2 static void gemm_big_m(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long N, long K) {
    long R = (8192 / (K > 0 ? K : 1)) & ~1L;        /* rows per chunk: 16 KB of bf16, even, at least 2 */
    if (R < 2) R = 2;
    long N2 = N & ~1L;
    for (long n0 = 0; n0 < N2; n0 += R) {
        long n1 = n0 + R < N2 ? n0 + R : N2;
        for (long m = 0; m < M; m += 6) {
            long mb = M - m < 6 ? M - m : 6;
            for (long n = n0; n < n1; n += 2)       /* prefetch the rows ahead on the first pass only */
                rows_x2(x + m * ldx, ldx, w + n * K, K, y + m * ldy + n, ldy, mb, m == 0);
        }
    }
    for (long n = N2; n < N; n++)
        for (long m = 0; m < M; m++) y[m * ldy + n] = dot_row(x + m * ldx, w + n * K, K);
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        /* MIMOFLASH_KERNELS_PORTABLE=1 forces the portable loops (tests run them on AVX2 machines too) */
        const char *force = getenv("MIMOFLASH_KERNELS_PORTABLE");
        cached = (!force || !*force || *force == '0') && __builtin_cpu_supports("avx2") &&
                 __builtin_cpu_supports("fma");
    }
    return cached;
}
#else
static int have_avx2(void) { return 0; }
#endif

static void gemm_range(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long N, long K) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (have_avx2()) {
        if (M <= 2) {
            gemm_small_m(x, ldx, w, y, ldy, M, N, K);
            return;
        }
        gemm_big_m(x, ldx, w, y, ldy, M, N, K);
        return;
    }
#endif
    gemm_portable(x, ldx, w, y, ldy, M, N, K);
}

void mf_bf16w_range(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long K, long n0,
                    long n1) {
    gemm_range(x, ldx, w + n0 * K, y + n0, ldy, M, n1 - n0, K);
}

/* Exported: y (M, N) = x (M, K) @ w (N, K)^T with w bf16 (a group of one, threads as mf_gemm_group says).
 * Allocates nothing, cannot fail. */
void mf_gemm_bf16w(const float *x, long ldx, const uint16_t *w, float *y, long ldy, long M, long N, long K) {
    mf_product p = {MF_BF16, x, ldx, w, NULL, 0, 0, 0, y, ldy, M, N, K};
    mf_gemm_group(&p, 1);
}

/* ---- a group of products in one parallel region ----
 * A decode layer's products are small (the shipped model's are 50-300 KB of weights, 2-12 us on one core), so what
 * a parallel region costs (publishing the job, the other thread noticing it, the caller waiting for its last chunk:
 * about 1-2 us here) is a large share of each. Products that do not depend on each other (q|k|v; gate and up; all
 * routed experts' gate|up, then all their downs) therefore go into one region: their output rows are cut into
 * chunks, about 4 per thread (on this shared 2-vCPU machine one core often runs ~1.4x slower than the other, and
 * with one chunk per thread the fast one waited), of at least GROUP_MIN_CHUNK weights, and the threads claim chunks
 * of any product as they free up. A group under GROUP_MIN_WEIGHTS in all runs on the calling thread: split, such
 * products took longer at 2 threads than at 1 (benchmarks/bench_kernels.py's small shapes).
 * Chunk boundaries are multiples of each kernel's row group (4 rows; 4 panels; FP8 block rows), so every output is
 * computed by the same code in the same summation order whatever the thread count and chunking: results are
 * bit-identical for any thread count (tests/test_kernels.py). -> 0, or -1 when an FP8 chunk's scratch could not
 * be allocated. */
#ifndef GROUP_MIN_WEIGHTS
#define GROUP_MIN_WEIGHTS (1L << 16)
#endif
#ifndef GROUP_MIN_CHUNK
#define GROUP_MIN_CHUNK (1L << 13)
#endif

static int product_rows(const mf_product *p, long n0, long n1) {
    switch (p->kind) {
    case MF_FP8: return mf_fp8w_range(p, n0, n1);
    case MF_PANELS: mf_bf16p_range(p->x, p->ldx, (const uint16_t *)p->w, p->y, p->ldy, p->M, p->N, p->K, n0, n1);
        return 0;
    default: mf_bf16w_range(p->x, p->ldx, (const uint16_t *)p->w, p->y, p->ldy, p->M, p->K, n0, n1);
        return 0;
    }
}

static long product_align(const mf_product *p) {         /* rows: the kernel's row group */
    if (p->kind == MF_PANELS) return 64;                   /* 4 panels of 16 (panels.c's one-row group) */
    if (p->kind == MF_FP8) return p->br % 4 == 0 ? p->br : 4 * p->br;
    return 4;
}

typedef struct {
    const mf_product *p;
    const long *per, *first;        /* rows per chunk of product i; its first task (first[n] = all tasks) */
    atomic_int failed;
} group_job;

static void group_task(void *ctx, long t) {
    group_job *j = (group_job *)ctx;
    long i = 0;
    while (t >= j->first[i + 1]) i++;
    const mf_product *p = j->p + i;
    long n0 = (t - j->first[i]) * j->per[i], n1 = n0 + j->per[i] < p->N ? n0 + j->per[i] : p->N;
    if (product_rows(p, n0, n1)) atomic_store(&j->failed, 1);
}

int mf_gemm_group(const mf_product *p, long n) {
    long T = mf_num_threads(), total = 0;
    int fp8 = 0;
    for (long i = 0; i < n; i++) {
        total += p[i].M > 0 ? p[i].N * p[i].K : 0;
        fp8 |= p[i].kind == MF_FP8;
    }
    if (fp8) mf_fp8_init();                              /* before any pool thread reads its tables */
    if (T == 1 || total < GROUP_MIN_WEIGHTS) {
        int rc = 0;
        for (long i = 0; i < n; i++)
            if (p[i].M > 0 && p[i].N > 0) rc |= product_rows(p + i, 0, p[i].N);
        return rc;
    }
    long budget = total / (4 * T) > GROUP_MIN_CHUNK ? total / (4 * T) : GROUP_MIN_CHUNK;
    long per[n > 0 ? n : 1], first[n + 1];
    first[0] = 0;
    for (long i = 0; i < n; i++) {
        long a = product_align(p + i), K = p[i].K > 0 ? p[i].K : 1;
        per[i] = ((budget + K - 1) / K + a - 1) / a * a;
        first[i + 1] = first[i] + (p[i].M > 0 && p[i].N > 0 ? (p[i].N + per[i] - 1) / per[i] : 0);
    }
    group_job j = {p, per, first, 0};
    mf_parallel(first[n], group_task, &j);
    return j.failed ? -1 : 0;
}

int mf_simd_level(void) { return have_avx2() ? 2 : 0; }
