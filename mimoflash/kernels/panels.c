/* bf16-weight matmul on weights packed in panels: y (M, N) fp32 = x (M, K) fp32 @ w (N, K)^T, where w is stored
 * as ceil(N / 16) panels of 16 output rows, each panel k-major: for every k, 16 weights in 32 bytes.
 *
 * Why a second layout: with the checkpoint's row-major (N, K) weights a GEMM must take dot products along k (one
 * accumulator per (x row, weight row), horizontal sums at the end, every bf16 vector converted once per x block),
 * as wgemm.c's best tile (6 x rows x 2 weight rows) does. In a panel, one 32-byte load holds the k-th weight of 16
 * outputs, so the tile is an outer product: 6 x values broadcast, 12 FMAs into (6 rows x 16 outputs) accumulators,
 * 1 load + 2 integer ops of conversion per 12 FMAs and no horizontal sums (16-row products 1.2-1.3x the row-major
 * tile in benchmarks/bench_kernels.py). A 16-request decode step is mostly such products (the lm_head alone is 16 x
 * 32000 x 512), so this is where batched decoding gains on one request. Panels are read front to back, so one or
 * two rows (the single-request step) stream at the memory rate like the row-major kernel.
 *
 * Interleave: within a k-row of a panel, 32-bit word j holds output j's weight in its low half and output j + 8's
 * in its high half, so `word << 16` gives outputs 0-7 as fp32 and `word & 0xffff0000` gives 8-15, both exact.
 * N is padded to a multiple of 16 with zero rows. engine/cpu_layout.py packs (kernels.pack_panels) and
 * tests/test_panels.py checks every path against F.linear on the unpacked weight.
 */
#include <stdint.h>
#include <string.h>

#include "mimoflash_kernels.h"          /* every kernel's prototype */

#define PW 16                                         /* outputs per panel */

static inline float bf16_at(const uint16_t *panel, long k, int j) {
    uint32_t u = (uint32_t)panel[k * PW + 2 * (j & 7) + (j >> 3)] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Portable: any machine, and the reference for the vector path's layout. */
static void panels_portable(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N,
                            long K, long p0, long p1) {
    for (long p = p0; p < p1; p++) {
        const uint16_t *panel = wp + p * K * PW;
        for (long m = 0; m < M; m++)
            for (int j = 0; j < PW && p * PW + j < N; j++) {
                float acc = 0.f;
                for (long k = 0; k < K; k++) acc += x[m * ldx + k] * bf16_at(panel, k, j);
                y[m * ldy + p * PW + j] = acc;
            }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))

/* Up to 6 x rows against one panel. Accumulators are named variables (an array of them was kept in memory by GCC,
 * a store per FMA); `mb_ > i` is a compile-time constant in each instantiation, so unused rows vanish. */
#define PF_BYTES 1024                                 /* software prefetch distance of the one/two-row kernels */
#define FMA_ROW(i)                                                                                                \
    if (mb_ > i) {                                                                                                \
        __m256 xb = _mm256_broadcast_ss(x + i * ldx + k);                                                         \
        a##i##0 = _mm256_fmadd_ps(xb, lo, a##i##0);                                                               \
        a##i##1 = _mm256_fmadd_ps(xb, hi, a##i##1);                                                               \
    }
#define STORE_ROW(i)                                                                                              \
    if (mb_ > i) {                                                                                                \
        _mm256_storeu_ps(out + i * ldo, a##i##0);                                                                 \
        _mm256_storeu_ps(out + i * ldo + 8, a##i##1);                                                             \
    }
#define PANEL_ROWS(MB)                                                                                            \
    AVX2 static void panel##MB(const float *x, long ldx, const uint16_t *panel, long K, float *out, long ldo,     \
                               const char *next) {                                                                \
        const int mb_ = MB;                                                                                       \
        const __m256i mask = _mm256_set1_epi32((int)0xffff0000u);                                                 \
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,      \
               a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;                                             \
        for (long k = 0; k < K; k++) {                                                                            \
            if (next && (k & 1) == 0) _mm_prefetch(next + k * PW * 2, _MM_HINT_T1);                               \
            __m256i w = _mm256_loadu_si256((const __m256i *)(panel + k * PW));                                    \
            __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));                                            \
            __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w, mask));                                           \
            FMA_ROW(0) FMA_ROW(1) FMA_ROW(2) FMA_ROW(3) FMA_ROW(4) FMA_ROW(5)                                      \
        }                                                                                                         \
        STORE_ROW(0) STORE_ROW(1) STORE_ROW(2) STORE_ROW(3) STORE_ROW(4) STORE_ROW(5)                             \
    }
PANEL_ROWS(1)
PANEL_ROWS(2)
PANEL_ROWS(3)
PANEL_ROWS(4)
PANEL_ROWS(5)
PANEL_ROWS(6)

/* One or two x rows (the single-request step, two requests): one panel's chains would wait on FMA latency (2-4
 * chains of 4 cycles: below the memory rate), so 4 (one row) or 2 (two rows) panels go side by side, 8 accumulators
 * in all. Each output still sums k in order in one chain, as in PANEL_ROWS, so a row's result does not depend on
 * the batch it is in. */
#define CVT_LO(w) _mm256_castsi256_ps(_mm256_slli_epi32(w, 16))
#define CVT_HI(w) _mm256_castsi256_ps(_mm256_and_si256(w, mask))
#define LOAD_K(q) _mm256_loadu_si256((const __m256i *)(panel + (q) * K * PW + k * PW))
#define PF_K(q) _mm_prefetch((const char *)(panel + (q) * K * PW + k * PW) + PF_BYTES, _MM_HINT_T0)

/* Named accumulators again: with an array, GCC stored all 8 to the stack every iteration, and one row ran at 0.7x
 * the row-major kernel's rate on cached weights. */
AVX2 static void few1(const float *x, long ldx, const uint16_t *panel, long K, float *out, long ldo) {
    (void)ldx;
    (void)ldo;
    const __m256i mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    for (long k = 0; k < K; k++) {
        if ((k & 1) == 0) {
            PF_K(0); PF_K(1); PF_K(2); PF_K(3);
        }
        __m256 xb = _mm256_broadcast_ss(x + k);
        __m256i w0 = LOAD_K(0), w1 = LOAD_K(1), w2 = LOAD_K(2), w3 = LOAD_K(3);
        a0 = _mm256_fmadd_ps(xb, CVT_LO(w0), a0);
        a1 = _mm256_fmadd_ps(xb, CVT_HI(w0), a1);
        b0 = _mm256_fmadd_ps(xb, CVT_LO(w1), b0);
        b1 = _mm256_fmadd_ps(xb, CVT_HI(w1), b1);
        c0 = _mm256_fmadd_ps(xb, CVT_LO(w2), c0);
        c1 = _mm256_fmadd_ps(xb, CVT_HI(w2), c1);
        d0 = _mm256_fmadd_ps(xb, CVT_LO(w3), d0);
        d1 = _mm256_fmadd_ps(xb, CVT_HI(w3), d1);
    }
    _mm256_storeu_ps(out, a0);
    _mm256_storeu_ps(out + 8, a1);
    _mm256_storeu_ps(out + 16, b0);
    _mm256_storeu_ps(out + 24, b1);
    _mm256_storeu_ps(out + 32, c0);
    _mm256_storeu_ps(out + 40, c1);
    _mm256_storeu_ps(out + 48, d0);
    _mm256_storeu_ps(out + 56, d1);
}

AVX2 static void few2(const float *x, long ldx, const uint16_t *panel, long K, float *out, long ldo) {
    const __m256i mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    for (long k = 0; k < K; k++) {
        if ((k & 1) == 0) {
            PF_K(0); PF_K(1);
        }
        __m256 xb = _mm256_broadcast_ss(x + k), xc = _mm256_broadcast_ss(x + ldx + k);
        __m256i w0 = LOAD_K(0), w1 = LOAD_K(1);
        __m256 l0 = CVT_LO(w0), h0 = CVT_HI(w0), l1 = CVT_LO(w1), h1 = CVT_HI(w1);
        a0 = _mm256_fmadd_ps(xb, l0, a0);             /* row 0, panel 0 */
        a1 = _mm256_fmadd_ps(xb, h0, a1);
        b0 = _mm256_fmadd_ps(xb, l1, b0);             /* row 0, panel 1 */
        b1 = _mm256_fmadd_ps(xb, h1, b1);
        c0 = _mm256_fmadd_ps(xc, l0, c0);             /* row 1, panel 0 */
        c1 = _mm256_fmadd_ps(xc, h0, c1);
        d0 = _mm256_fmadd_ps(xc, l1, d0);             /* row 1, panel 1 */
        d1 = _mm256_fmadd_ps(xc, h1, d1);
    }
    _mm256_storeu_ps(out, a0);
    _mm256_storeu_ps(out + 8, a1);
    _mm256_storeu_ps(out + 16, b0);
    _mm256_storeu_ps(out + 24, b1);
    _mm256_storeu_ps(out + ldo, c0);
    _mm256_storeu_ps(out + ldo + 8, c1);
    _mm256_storeu_ps(out + ldo + 16, d0);
    _mm256_storeu_ps(out + ldo + 24, d1);
}

/* One panel for all M rows: blocks of at most 6 rows, balanced (M = 8 -> 4 + 4, not 6 + 2); the panel (K x 32
 * bytes: 16 KB at K = 512) stays in L1/L2 across the blocks, so it is read from memory once. The first block pulls
 * the next panel in (the T1 hint: L2, and L1 too before Zen 4), one line per two k-rows; a prefetch a fixed
 * distance ahead in the current panel came too late, as the first block waited on memory. The last
 * panel of an N that is not a multiple of 16 goes through a 16-wide scratch row. */
AVX2 static void panel_all_rows(const float *x, long ldx, const uint16_t *panel, float *y, long ldy, long M,
                                long K, long width) {
    float tmp[6 * PW];
    long nb = (M + 5) / 6;
    for (long b = 0, m = 0; b < nb; b++) {
        long mb = (M - m) / (nb - b);
        float *out = width == PW ? y + m * ldy : tmp;
        long ldo = width == PW ? ldy : PW;
        const float *xm = x + m * ldx;
        const char *pf = b == 0 ? (const char *)(panel + K * PW) : NULL;   /* past the end: prefetches don't fault */
        switch (mb) {
        case 6: panel6(xm, ldx, panel, K, out, ldo, pf); break;
        case 5: panel5(xm, ldx, panel, K, out, ldo, pf); break;
        case 4: panel4(xm, ldx, panel, K, out, ldo, pf); break;
        case 3: panel3(xm, ldx, panel, K, out, ldo, pf); break;
        case 2: panel2(xm, ldx, panel, K, out, ldo, pf); break;
        default: panel1(xm, ldx, panel, K, out, ldo, pf); break;
        }
        if (width < PW)
            for (long r = 0; r < mb; r++) memcpy(y + (m + r) * ldy, tmp + r * PW, sizeof(float) * (size_t)width);
        m += mb;
    }
}

/* Panels [p0, p1): groups of NP full panels through few##M for M <= 2, the rest one panel at a time. */
AVX2 static void panels_avx2(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N,
                             long K, long p0, long p1) {
    long p = p0, full = N / PW < p1 ? N / PW : p1;        /* panels before `full` have 16 real outputs */
    if (M == 1)
        for (; p + 4 <= full; p += 4) few1(x, ldx, wp + p * K * PW, K, y + p * PW, ldy);
    else if (M == 2)
        for (; p + 2 <= full; p += 2) few2(x, ldx, wp + p * K * PW, K, y + p * PW, ldy);
    for (; p < p1; p++) {
        long width = N - p * PW < PW ? N - p * PW : PW;
        panel_all_rows(x, ldx, wp + p * K * PW, y + p * PW, ldy, M, K, width);
    }
}

#endif

static void panels_range(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N, long K,
                         long p0, long p1) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (mf_simd_level() == 2) {                      /* wgemm.c's run-time AVX2+FMA check (and its override) */
        panels_avx2(x, ldx, wp, y, ldy, M, N, K, p0, p1);
        return;
    }
#endif
    panels_portable(x, ldx, wp, y, ldy, M, N, K, p0, p1);
}

/* Output rows [n0, n1) of the product, n0 a multiple of 64 (mf_gemm_group's chunks): its panels. */
void mf_bf16p_range(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N, long K,
                    long n0, long n1) {
    panels_range(x, ldx, wp, y, ldy, M, N, K, n0 / PW, (n1 + PW - 1) / PW);
}

/* Exported: y (M, N) = x (M, K) @ w^T for w packed by kernels.pack_panels (a group of one, threads as mf_gemm_group
 * says: chunks of a multiple of 4 panels, the one-row kernel's group). Each output is computed by one task in a
 * fixed order, so the result does not depend on the thread count. Allocates nothing, cannot fail. */
void mf_gemm_bf16p(const float *x, long ldx, const uint16_t *wp, float *y, long ldy, long M, long N, long K) {
    mf_product p = {MF_PANELS, x, ldx, wp, NULL, 0, 0, 0, y, ldy, M, N, K};
    mf_gemm_group(&p, 1);
}
