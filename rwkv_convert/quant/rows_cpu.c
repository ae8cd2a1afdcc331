/* Few-token matmuls against weights stored as rows ([out, in], each output's weights contiguous), summed
 * in fp32: y[t, m] = sum_n x[t, n] * W[m, n].
 *
 * Two element types, the same loop:
 *  - bf16 (rwkv_bf16_matmul): widening bf16 to fp32 is exact, so this is the fp32 result of a bf16 model
 *    while reading half the bytes of fp32 weights;
 *  - the rwkv pip package's int8 (rwkv_int8_rows), W[m, n] = (q[m, n] + 0.5) * ry[n] * rx[m] + my[n] + mx[m]:
 *    y[t, m] = rx[m] * (sum_n (x[t, n] ry[n]) q[m, n] + 0.5 sum_n x[t, n] ry[n]) + sum_n x[t, n] my[n]
 *              + mx[m] sum_n x[t, n], one byte read per weight.
 * Decoding on a CPU is bound by those reads. Rows are split across OpenMP threads; ROWS rows are read side
 * by side (sequential streams) against up to TOKENS tokens, every sum in a vector register. GCC/Clang vector
 * extensions compile to AVX-512, AVX2 or NEON, whichever -march=native gives. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16
#define ROWS 4 /* measured against 2 and 8, and TOKENS 2 */
#define TOKENS 4

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

static inline vf widen_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float widen1_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline vf widen_u8(const uint8_t *p) {
#if defined(__AVX512F__)
    /* two instructions; GCC's generic conversion below takes three */
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
    vf v;
    memcpy(&v, &f, sizeof v);
    return v;
#else
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(b, vh), vu), vf); /* via 16
                                                                                bits: GCC vectorises that */
#endif
}

static inline float widen1_u8(uint8_t b) { return (float)b; }

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(vf v) {
    float half[LANES / 2];
    for (int j = 0; j < LANES / 2; j++) half[j] = v[j] + v[j + LANES / 2];
    float s = 0.0f;
    for (int j = 0; j < LANES / 2; j++) s += half[j];
    return s;
}

/* matmul_<type>: rows [m0, m0 + ROWS) of W (element type TYPE, widened by WIDEN) against tokens
 * [t0, t0 + TOKENS) per tile, tiles split across threads. One function per element type (a macro, so that
 * each gets its own vectorised loop). The tile is inlined with constant row and token counts for full tiles:
 * then its ROWS x TOKENS sums stay in registers (with runtime counts GCC kept them on the stack, a load and a
 * store around every FMA). Measured, 768x768 bf16 on 2 cores: 43 -> 32 us a matrix, and 72 -> 44 us at 4 tokens. */
#define DEFINE_MATMUL(NAME, TYPE, WIDEN, WIDEN1)                                                              \
    static inline __attribute__((always_inline)) void NAME##_tile(const float *x, const TYPE *w, float *y,    \
                                                                  int64_t N, int64_t M, int64_t m0, int64_t t0, \
                                                                  const int rows, const int tokens) {          \
        const int64_t body = N - N % LANES;                                                                   \
        vf acc[ROWS][TOKENS];                                                                                 \
        for (int r = 0; r < ROWS; r++)                                                                        \
            for (int t = 0; t < TOKENS; t++) acc[r][t] = (vf){0};                                             \
        for (int64_t n = 0; n < body; n += LANES) {                                                           \
            vf xv[TOKENS];                                                                                    \
            for (int t = 0; t < tokens; t++) xv[t] = load(x + (t0 + t) * N + n);                              \
            for (int r = 0; r < rows; r++) {                                                                  \
                const TYPE *at = w + (m0 + r) * N + n;                                                        \
                /* the same place two tiles on: measured 15 -> 23 GB/s, against 28 for a plain read */         \
                __builtin_prefetch(at + 2 * ROWS * N);                                                        \
                const vf wv = WIDEN(at);                                                                      \
                for (int t = 0; t < tokens; t++) acc[r][t] += wv * xv[t];                                     \
            }                                                                                                 \
        }                                                                                                     \
        for (int r = 0; r < rows; r++)                                                                        \
            for (int t = 0; t < tokens; t++) {                                                                \
                float s = hsum(acc[r][t]);                                                                    \
                for (int64_t n = body; n < N; n++) s += WIDEN1(w[(m0 + r) * N + n]) * x[(t0 + t) * N + n];    \
                y[(t0 + t) * M + m0 + r] = s;                                                                 \
            }                                                                                                 \
    }                                                                                                         \
    static void NAME(const float *x, const TYPE *w, float *y, int64_t T, int64_t N, int64_t M, int threads) { \
        const int64_t n_tiles = (M + ROWS - 1) / ROWS;                                                        \
        for (int64_t t0 = 0; t0 < T; t0 += TOKENS) {                                                          \
            const int tokens = (int)((t0 + TOKENS <= T) ? TOKENS : T - t0);                                   \
            _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
            for (int64_t i = 0; i < n_tiles; i++) {                                                           \
                const int64_t m0 = i * ROWS;                                                                  \
                if (m0 + ROWS > M)                                                                            \
                    NAME##_tile(x, w, y, N, M, m0, t0, (int)(M - m0), tokens);                                \
                else if (tokens == 1)                                                                         \
                    NAME##_tile(x, w, y, N, M, m0, t0, ROWS, 1);                                              \
                else if (tokens == 2)                                                                         \
                    NAME##_tile(x, w, y, N, M, m0, t0, ROWS, 2);                                              \
                else if (tokens == 3)                                                                         \
                    NAME##_tile(x, w, y, N, M, m0, t0, ROWS, 3);                                              \
                else                                                                                          \
                    NAME##_tile(x, w, y, N, M, m0, t0, ROWS, TOKENS);                                         \
            }                                                                                                 \
        }                                                                                                     \
    }

DEFINE_MATMUL(matmul_bf16, uint16_t, widen_bf16, widen1_bf16)
DEFINE_MATMUL(matmul_u8, uint8_t, widen_u8, widen1_u8)

/* x fp32 [T, N]; w bf16 [M, N]; y fp32 [T, M] */
void rwkv_bf16_matmul(const float *x, const uint16_t *w, float *y, int64_t T, int64_t N, int64_t M, int threads) {
    matmul_bf16(x, w, y, T, N, M, threads);
}

/* x fp32 [T, N]; q uint8 [M, N] (the package's [N, M] transposed); companions fp32 mx, rx [M], my, ry [N];
 * y fp32 [T, M]. Returns 0, or -1 if it could not allocate its scratch. */
int rwkv_int8_rows(const float *x, const uint8_t *q, const float *mx, const float *rx, const float *my,
                   const float *ry, float *y, int64_t T, int64_t N, int64_t M, int threads) {
    float *xr = (float *)malloc(sizeof(float) * (size_t)(T * N));
    double *sums = (double *)malloc(sizeof(double) * 3 * (size_t)T);
    if (!xr || !sums) {
        free(xr);
        free(sums);
        return -1;
    }
    for (int64_t t = 0; t < T; t++) {
        double s_xr = 0.0, s_x = 0.0, s_xmy = 0.0;
        for (int64_t n = 0; n < N; n++) {
            const float xn = x[t * N + n];
            xr[t * N + n] = xn * ry[n];
            s_xr += xr[t * N + n];
            s_x += xn;
            s_xmy += (double)xn * my[n];
        }
        sums[3 * t] = s_xr, sums[3 * t + 1] = s_x, sums[3 * t + 2] = s_xmy;
    }
    matmul_u8(xr, q, y, T, N, M, threads);
    for (int64_t t = 0; t < T; t++) {
        const float half_xr = 0.5f * (float)sums[3 * t], s_x = (float)sums[3 * t + 1], s_xmy = (float)sums[3 * t + 2];
        for (int64_t m = 0; m < M; m++) y[t * M + m] = rx[m] * (y[t * M + m] + half_xr) + s_xmy + mx[m] * s_x;
    }
    free(xr);
    free(sums);
    return 0;
}
