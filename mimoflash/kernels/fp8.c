/* Block-FP8 weight matmuls for CPU decoding: y (M, N) fp32 = x (M, K) fp32 @ W^T, where W (N, K) is stored as
 * E4M3 bytes with one fp32 scale per (br x bc) tile (docs/MODEL.md §4.3, checkpoint/fp8.py):
 *     W[n, k] = e4m3(Wq[n, k]) * S[n / br, k / bc].
 *
 * Why: decode reads every weight it uses once per token, so bytes per token set the speed, and an FP8 checkpoint is
 * half the bytes of bf16. Keeping the bytes as shipped and dequantising inside the product gives the exact fp32
 * dequantisation up to rounding order (no bf16 rounding of the dequantised weights).
 *
 * Conversion: an E4M3 byte s.eeee.mmm becomes the fp16 bit pattern s.0eeee.mmm0000000 (two shifts, two masks, an
 * or), whose value is exactly the E4M3 value / 256 for normal and subnormal bytes alike (both formats' subnormals
 * scale by the same 2^8); F16C's vcvtph2ps widens 8 of them to fp32 in one instruction. The factor 256 and the tile
 * scale are folded into the activations: for each block row of weights, xs[m, k] = x[m, k] * (S[nb, k / bc] * 256),
 * a (M, K) vector computed once per block row (K products) and reused for its br rows, so the inner loop is the
 * conversion and one FMA per x row, like the bf16 kernel (wgemm.c). Any block size works, ragged edges included.
 * The byte 0x7f (E4M3 NaN) decodes to 480 here; checkpoints hold no NaN.
 *
 * Three or more x rows convert each weight once per block of four x rows (rows_avx2_many).
 * With AVX-512 (rows_avx512) the conversion takes one instruction fewer and widens 16 at a time, ragged K tails are
 * masked loads, and the 32 registers hold wider blocks: each converted vector feeds up to 8 x rows' FMAs.
 * The widest path the CPU has (AVX-512, else AVX2+FMA+F16C) is picked at run time; elsewhere a portable loop reads a
 * 256-entry table of the same values. Products are split by block rows over the pool's threads with the other
 * products of their group (wgemm.c's mf_gemm_group); each output is computed by one thread in the same order whatever the thread count. The AVX-512 loops
 * prefetch the next weight rows (the hardware prefetcher stops at 4 KB pages, and routed experts are pages of the
 * mapped files). Python wrappers: kernels/fp8.py, tested against F.linear(x, dequantize_fp8_block(w, s)) in
 * tests/test_fp8_runtime.py; the fused decode step (decode.c) calls these kernels for FP8 layers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mimoflash_kernels.h"          /* every kernel's prototype */

static float fp8_lut[256];      /* E4M3 value / 256 (the fp16 reading of the shifted byte) */
static int fp8_lut_ready = 0;

static void fp8_lut_init(void) {
    if (fp8_lut_ready) return;
    for (int b = 0; b < 256; b++) {
        int e = (b >> 3) & 15, m = b & 7;
        float v = e ? ldexpf(1.f + m / 8.f, e - 15) : ldexpf(m / 8.f, -14);
        fp8_lut[b] = (b & 0x80) ? -v : v;
    }
    fp8_lut_ready = 1;
}

/* xs (M, K) = x (M, K) * (S[nb, k / bc] * 256): the activations of one block row, scaled. */
static void scale_rows(const float *x, long ldx, long M, long K, const float *s_row, long bc, float *xs) {
    for (long m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        float *o = xs + m * K;
        for (long k0 = 0; k0 < K; k0 += bc) {
            float sc = s_row[k0 / bc] * 256.f;
            long k1 = k0 + bc < K ? k0 + bc : K;
            for (long k = k0; k < k1; k++) o[k] = xr[k] * sc;
        }
    }
}

static void rows_portable(const float *xs, long M, long K, const uint8_t *w, long rows, float *y, long ldy) {
    for (long n = 0; n < rows; n++)
        for (long m = 0; m < M; m++) {
            const uint8_t *wr = w + n * K;
            const float *xr = xs + m * K;
            float acc = 0.f;
            for (long k = 0; k < K; k++) acc += xr[k] * fp8_lut[wr[k]];
            y[m * ldy + n] = acc;
        }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FP8_SIMD __attribute__((target("avx2,fma,f16c")))

/* 16 bytes -> two fp32 vectors. In each 16-bit lane: b << 8 = s.eeee.mmm.00000000; an arithmetic shift right by one
 * copies the sign into bit 14, which the mask clears: s.0eeee.mmm0000000, the fp16 pattern of E4M3 / 256. */
FP8_SIMD static inline void fp8x16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(b, 8), 1), _mm256_set1_epi16((short)0xbfff));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

FP8_SIMD static inline __m256 fp8x8(const uint8_t *p) {
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(b, 8), 1), _mm_set1_epi16((short)0xbfff)));
}

FP8_SIMD static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

FP8_SIMD static float dot_fp8(const float *xr, const uint8_t *wr, long K) {
    __m256 a = _mm256_setzero_ps(), c = a, lo, hi;
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        fp8x16(wr + k, &lo, &hi);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), lo, a);
        c = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8), hi, c);
    }
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), fp8x8(wr + k), a);
    float acc = hsum8(_mm256_add_ps(a, c));
    for (; k < K; k++) acc += xr[k] * fp8_lut[wr[k]];
    return acc;
}

/* Three or more x rows (batched decode): two weight rows at a time, 16 bytes of each converted once per block of
 * up to four x rows (8 accumulators, 4 converted vectors, one x vector live: 13 of the 16 registers), so the
 * conversion is spread over four rows' FMAs instead of two. Widening to a bf16 buffer and running the bf16 kernel
 * was tried instead and measured 1.1-2x slower than this at 3 to 16 rows (the widening pass costs as much as the
 * product). MB is a compile-time constant in each instantiation. */
#define FP8_X_ROWS(MB)                                                                                                \
    FP8_SIMD static void x##MB##_rows2(const float *x, long K, const uint8_t *w0, float *y, long ldy) {            \
        const uint8_t *w1 = w0 + K;                                                                                \
        long K16 = K & ~15L;                                                                                       \
        __m256 a[MB][2], l0, h0, l1, h1;                                                                           \
        for (int m = 0; m < MB; m++) a[m][0] = a[m][1] = _mm256_setzero_ps();                                      \
        for (long k = 0; k < K16; k += 16) {                                                                       \
            _mm_prefetch((const char *)(w0 + 2 * K) + 2 * k, _MM_HINT_T0);                                         \
            fp8x16(w0 + k, &l0, &h0);                                                                              \
            fp8x16(w1 + k, &l1, &h1);                                                                              \
            for (int m = 0; m < MB; m++) {                                                                         \
                __m256 u = _mm256_loadu_ps(x + m * K + k), v = _mm256_loadu_ps(x + m * K + k + 8);                 \
                a[m][0] = _mm256_fmadd_ps(v, h0, _mm256_fmadd_ps(u, l0, a[m][0]));                                 \
                a[m][1] = _mm256_fmadd_ps(v, h1, _mm256_fmadd_ps(u, l1, a[m][1]));                                 \
            }                                                                                                      \
        }                                                                                                          \
        for (int m = 0; m < MB; m++) {                                                                             \
            float r0 = hsum8(a[m][0]), r1 = hsum8(a[m][1]);                                                        \
            for (long k = K16; k < K; k++) {                                                                       \
                r0 += x[m * K + k] * fp8_lut[w0[k]];                                                               \
                r1 += x[m * K + k] * fp8_lut[w1[k]];                                                               \
            }                                                                                                      \
            y[m * ldy] = r0;                                                                                       \
            y[m * ldy + 1] = r1;                                                                                   \
        }                                                                                                          \
    }
FP8_X_ROWS(1)
FP8_X_ROWS(2)
FP8_X_ROWS(3)
FP8_X_ROWS(4)

FP8_SIMD static void rows_avx2_many(const float *xs, long M, long K, const uint8_t *w, long rows, float *y, long ldy) {
    long n = 0;
    for (; n + 2 <= rows; n += 2)
        for (long m = 0; m < M; m += 4) {
            const float *xm = xs + m * K;
            float *ym = y + m * ldy + n;
            switch (M - m < 4 ? M - m : 4) {
            case 4: x4_rows2(xm, K, w + n * K, ym, ldy); break;
            case 3: x3_rows2(xm, K, w + n * K, ym, ldy); break;
            case 2: x2_rows2(xm, K, w + n * K, ym, ldy); break;
            default: x1_rows2(xm, K, w + n * K, ym, ldy); break;
            }
        }
    for (; n < rows; n++)
        for (long m = 0; m < M; m++) y[m * ldy + n] = dot_fp8(xs + m * K, w + n * K, K);
}

static long fp8_many_rows = 3;      /* from this many x rows on, rows_avx2_many */

/* Four weight rows at a time, 16 bytes of each converted per step, against one x row (decode of one sequence) or
 * pairs of x rows (each conversion used twice). The K % 16 tail goes through dot_fp8's scalar-friendly path. */
FP8_SIMD static void rows_avx2(const float *xs, long M, long K, const uint8_t *w, long rows, float *y, long ldy) {
    if (M >= fp8_many_rows) {
        rows_avx2_many(xs, M, K, w, rows, y, ldy);
        return;
    }
    long K16 = K & ~15L, n = 0;
    for (; n + 4 <= rows; n += 4) {
        const uint8_t *wr[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
        for (long m = 0; m < M; m += 2) {
            const float *x0 = xs + m * K, *x1 = m + 1 < M ? x0 + K : NULL;
            __m256 a[4], b[4], lo, hi;
            for (int j = 0; j < 4; j++) a[j] = b[j] = _mm256_setzero_ps();
            if (!x1) {
                for (long k = 0; k < K16; k += 16) {
                    _mm_prefetch((const char *)(wr[0] + 4 * K) + 4 * k, _MM_HINT_T0);
                    __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x0 + k + 8);
                    for (int j = 0; j < 4; j++) {
                        fp8x16(wr[j] + k, &lo, &hi);
                        a[j] = _mm256_fmadd_ps(u, lo, a[j]);
                        b[j] = _mm256_fmadd_ps(v, hi, b[j]);
                    }
                }
                for (int j = 0; j < 4; j++) {
                    float r = hsum8(_mm256_add_ps(a[j], b[j]));
                    for (long k = K16; k < K; k++) r += x0[k] * fp8_lut[wr[j][k]];
                    y[m * ldy + n + j] = r;
                }
            } else {
                for (long k = 0; k < K16; k += 16) {
                    _mm_prefetch((const char *)(wr[0] + 4 * K) + 4 * k, _MM_HINT_T0);
                    __m256 u0 = _mm256_loadu_ps(x0 + k), u1 = _mm256_loadu_ps(x0 + k + 8);
                    __m256 v0 = _mm256_loadu_ps(x1 + k), v1 = _mm256_loadu_ps(x1 + k + 8);
                    for (int j = 0; j < 4; j++) {
                        fp8x16(wr[j] + k, &lo, &hi);
                        a[j] = _mm256_fmadd_ps(u1, hi, _mm256_fmadd_ps(u0, lo, a[j]));
                        b[j] = _mm256_fmadd_ps(v1, hi, _mm256_fmadd_ps(v0, lo, b[j]));
                    }
                }
                for (int j = 0; j < 4; j++) {
                    float r = hsum8(a[j]), t = hsum8(b[j]);
                    for (long k = K16; k < K; k++) {
                        float c = fp8_lut[wr[j][k]];
                        r += x0[k] * c;
                        t += x1[k] * c;
                    }
                    y[m * ldy + n + j] = r;
                    y[(m + 1) * ldy + n + j] = t;
                }
            }
        }
    }
    for (; n < rows; n++)
        for (long m = 0; m < M; m++) y[m * ldy + n] = dot_fp8(xs + m * K, w + n * K, K);
}

/* ---- AVX-512 (F, BW, VL): 16 weights per vector, masked tails, 32 registers for wider blocks ----
 * The conversion in 16-bit lanes: the byte sign-extended is s...s.s.eeee.mmm; << 7 puts eeee.mmm in bits 7..13 and
 * the sign in bits 14 and 15; clearing bit 14 leaves s.0eeee.mmm0000000, the same fp16 pattern as above (sign
 * extension, shift, and: one instruction fewer than the AVX2 form), then vcvtph2ps widens 16 at once. */
#define FP8_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

FP8_AVX512 static inline __m512 fp8x16_512(const uint8_t *p) {
    __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16((short)0xbfff)));
}

/* The first n < 16 bytes (the rest read as 0, whose value is 0; nothing past p + n is read). */
FP8_AVX512 static inline __m512 fp8x16_512_tail(const uint8_t *p, __mmask16 t) {
    __m256i b = _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(t, p));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16((short)0xbfff)));
}

/* RB weight rows (stride K) against MB x rows (stride K): y[m * ldy + r] = sum_k x[m, k] w[r, k]. Each 16 weights
 * are converted once and used by MB FMAs; MB * RB accumulators stay in registers (RB, MB compile-time constants). */
#define FP8_K512(RB, MB)                                                                                              \
    FP8_AVX512 static void k512_##RB##x##MB(const float *x, long K, const uint8_t *w, float *y, long ldy) {          \
        __m512 a[MB][RB], c[RB];                                                                                   \
        for (int m = 0; m < MB; m++)                                                                               \
            for (int r = 0; r < RB; r++) a[m][r] = _mm512_setzero_ps();                                            \
        long k = 0;                                                                                                \
        for (; k + 16 <= K; k += 16) {                                                                             \
            _mm_prefetch((const char *)(w + RB * K) + RB * k, _MM_HINT_T0);  /* the next RB rows, across pages */ \
            for (int r = 0; r < RB; r++) c[r] = fp8x16_512(w + r * K + k);                                         \
            for (int m = 0; m < MB; m++) {                                                                         \
                __m512 u = _mm512_loadu_ps(x + m * K + k);                                                         \
                for (int r = 0; r < RB; r++) a[m][r] = _mm512_fmadd_ps(u, c[r], a[m][r]);                          \
            }                                                                                                      \
        }                                                                                                          \
        if (k < K) {                                                                                               \
            __mmask16 t = (__mmask16)((1u << (K - k)) - 1u);                                                       \
            for (int r = 0; r < RB; r++) c[r] = fp8x16_512_tail(w + r * K + k, t);                                 \
            for (int m = 0; m < MB; m++) {                                                                         \
                __m512 u = _mm512_maskz_loadu_ps(t, x + m * K + k);                                                \
                for (int r = 0; r < RB; r++) a[m][r] = _mm512_fmadd_ps(u, c[r], a[m][r]);                          \
            }                                                                                                      \
        }                                                                                                          \
        for (int m = 0; m < MB; m++)                                                                               \
            for (int r = 0; r < RB; r++) y[m * ldy + r] = _mm512_reduce_add_ps(a[m][r]);                           \
    }
FP8_K512(4, 1)
FP8_K512(4, 2)
FP8_K512(2, 1)
FP8_K512(2, 2)
FP8_K512(2, 3)
FP8_K512(2, 4)
FP8_K512(2, 5)
FP8_K512(2, 6)
FP8_K512(2, 7)
FP8_K512(2, 8)
FP8_K512(1, 1)
FP8_K512(1, 2)
FP8_K512(1, 3)
FP8_K512(1, 4)
FP8_K512(1, 5)
FP8_K512(1, 6)
FP8_K512(1, 7)
FP8_K512(1, 8)

typedef void (*k512_fn)(const float *, long, const uint8_t *, float *, long);
static const k512_fn k512_two[9] = {NULL, k512_2x1, k512_2x2, k512_2x3, k512_2x4, k512_2x5, k512_2x6, k512_2x7,
                                    k512_2x8};
static const k512_fn k512_one[9] = {NULL, k512_1x1, k512_1x2, k512_1x3, k512_1x4, k512_1x5, k512_1x6, k512_1x7,
                                    k512_1x8};

/* One or two x rows (decode of one or two sequences): four weight rows at a time. More: x rows in blocks of up to
 * eight, two weight rows at a time (each converted vector feeds up to 16 FMAs). Leftover weight rows one by one.
 * Row groups start at the range's first row, which mf_gemm_fp8w aligns to a multiple of 4, so each output is
 * computed by the same code whatever the thread count. */
FP8_AVX512 static void rows_avx512(const float *xs, long M, long K, const uint8_t *w, long rows, float *y, long ldy) {
    if (M <= 2) {
        k512_fn four = M == 1 ? k512_4x1 : k512_4x2;
        long n = 0;
        for (; n + 4 <= rows; n += 4) four(xs, K, w + n * K, y + n, ldy);
        for (; n < rows; n++) k512_one[M](xs, K, w + n * K, y + n, ldy);
        return;
    }
    for (long m = 0; m < M; m += 8) {
        long mb = M - m < 8 ? M - m : 8, n = 0;
        const float *xm = xs + m * K;
        float *ym = y + m * ldy;
        for (; n + 2 <= rows; n += 2) k512_two[mb](xm, K, w + n * K, ym + n, ldy);
        for (; n < rows; n++) k512_one[mb](xm, K, w + n * K, ym + n, ldy);
    }
}

/* 3: AVX-512 (F, BW, VL) with F16C and FMA; 2: AVX2 + FMA + F16C; 0: the portable loop. MIMOFLASH_KERNELS_PORTABLE
 * forces 0 and MIMOFLASH_KERNELS_NO_AVX512 caps it at 2 (the tests run every path this way). Tried for one row and
 * measured slower here: 32 bytes per conversion step (no gain), and a bf16 route (the exact E4M3 -> bf16 bits by
 * one ternary-logic instruction, vdpbf16ps against the activations split exactly into three bf16 parts): 1.3-1.6x
 * slower than this. */
static int env_set(const char *name) {
    const char *v = getenv(name);
    return v && *v && *v != '0';
}

static int fp8_simd(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        int avx2 = !env_set("MIMOFLASH_KERNELS_PORTABLE") && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        int avx512 = avx2 && !env_set("MIMOFLASH_KERNELS_NO_AVX512") && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
        cached = avx512 ? 3 : avx2 ? 2 : 0;
    }
    return cached;
}
#else
static int fp8_simd(void) { return 0; }
#endif

void mf_fp8_init(void) {
    fp8_lut_init();
    fp8_simd();
}

/* Output rows [n0, n1) of an FP8 product (mf_gemm_group's chunks: whole block rows, or the end): block row by block
 * row, the scaled activations in a per-thread buffer. -> 0, or -1 when that buffer could not be allocated. */
int mf_fp8w_range(const mf_product *p, long n0, long n1) {
    static _Thread_local float *buf = NULL;
    static _Thread_local size_t cap = 0;
    size_t need = (size_t)p->M * (size_t)p->K;
    if (cap < need) {
        free(buf);
        /* 64-byte aligned: a 64-byte vector load that straddles two cache lines costs two (the scaled rows are
         * read once per weight row; with malloc's 16-byte alignment a 16-row product ran 1.3x slower in some
         * processes) */
        buf = aligned_alloc(64, (need * sizeof(float) + 63) & ~(size_t)63);
        cap = buf ? need : 0;
        if (!buf) return -1;
    }
    const uint8_t *w = (const uint8_t *)p->w;
    for (long n = n0; n < n1;) {
        long nb = n / p->br, hi = (nb + 1) * p->br < n1 ? (nb + 1) * p->br : n1;
        scale_rows(p->x, p->ldx, p->M, p->K, p->s + nb * p->ldS, p->bc, buf);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        int level = fp8_simd();
        if (level == 3)
            rows_avx512(buf, p->M, p->K, w + n * p->K, hi - n, p->y + n, p->ldy);
        else if (level == 2)
            rows_avx2(buf, p->M, p->K, w + n * p->K, hi - n, p->y + n, p->ldy);
        else
#endif
            rows_portable(buf, p->M, p->K, w + n * p->K, hi - n, p->y + n, p->ldy);
        n = hi;
    }
    return 0;
}

/* Exported: y (M, N) = x (M, K) @ dequant(w, s)^T; w (N, K) E4M3 bytes row-major, s (ceil(N/br), ldS) fp32 with
 * ldS >= ceil(K/bc) (a group of one: threads as mf_gemm_group says). -> 0, or -1 when a scratch buffer could not
 * be allocated. */
int mf_gemm_fp8w(const float *x, long ldx, const uint8_t *w, const float *s, long ldS, float *y, long ldy, long M,
                 long N, long K, long br, long bc) {
    mf_product p = {MF_FP8, x, ldx, w, s, ldS, br, bc, y, ldy, M, N, K};
    return mf_gemm_group(&p, 1);
}

/* Exported: routed experts over tokens grouped by expert. x (P, D) rows sorted by expert, rows[i] of them for the
 * i-th listed expert, whose six pointers ptrs[6 i ..] are gate (F, D) bytes, gate scales, up (F, D), up scales,
 * down (D, F), down scales (scale grids row-major, ceil-div shapes). y (P, D) = down(silu(gate x) * up x) per row,
 * unweighted: mf_experts_rows, the fused decode step's expert code. -> 0, or -1 when memory ran out. */
int mf_experts_fp8(const float *x, long ldx, long D, long Fd, long n, const long *rows, const int64_t *ptrs, long br,
                   long bc, float *y, long ldy) {
    long P = 0;
    for (long i = 0; i < n; i++) P += rows[i];
    mf_expert *ex = malloc(sizeof(mf_expert) * (size_t)(n > 0 ? n : 1));
    float *h = malloc(sizeof(float) * (size_t)(2 * P * Fd + 1));
    int rc = -1;
    if (ex && h) {
        for (long i = 0; i < n; i++) {
            const int64_t *q = ptrs + 6 * i;
            mf_expert e = {(const void *)(intptr_t)q[0], (const void *)(intptr_t)q[2], (const void *)(intptr_t)q[4],
                           (const float *)(intptr_t)q[1], (const float *)(intptr_t)q[3],
                           (const float *)(intptr_t)q[5]};
            ex[i] = e;
        }
        rc = mf_experts_rows(ex, n, rows, x, ldx, D, Fd, br, bc, h, y, ldy) ? -1 : 0;
    }
    free(ex);
    free(h);
    return rc;
}
