/* Few-token matmul with bf16 weights computed in fp32: y[t, m] = sum_n x[t, n] * W[m, n].
 *
 * W is bf16 [M, N] row-major ([out, in], each output's weights contiguous). A bf16 value widened to fp32
 * is exact, so this is the fp32 result of a bf16 model while reading half the bytes of fp32 weights, which
 * is what bounds decoding on a CPU. Rows are split across OpenMP threads; ROWS rows are read side by side
 * (sequential streams for the prefetcher) against up to TOKENS tokens, all sums in vector registers.
 * GCC/Clang vector extensions compile to AVX-512, AVX2 or NEON, whichever -march=native gives. */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define ROWS 4 /* measured against 2 and 8, and TOKENS 2 */
#define TOKENS 4

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

static inline vf widen(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

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

static inline float widen1(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* rows [m0, m0 + rows) against tokens [t0, t0 + tokens); rows <= ROWS, tokens <= TOKENS */
static void tile(const float *x, const uint16_t *w, float *y, int64_t N, int64_t M, int64_t m0, int rows,
                 int64_t t0, int tokens) {
    vf acc[ROWS][TOKENS];
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < TOKENS; t++) acc[r][t] = (vf){0};
    const int64_t body = N - N % LANES;
    for (int64_t n = 0; n < body; n += LANES) {
        vf xv[TOKENS];
        for (int t = 0; t < tokens; t++) xv[t] = load(x + (t0 + t) * N + n);
        for (int r = 0; r < rows; r++) {
            const uint16_t *at = w + (m0 + r) * N + n;
            /* the same place two tiles on: measured 15 -> 23 GB/s, against 28 for a plain read */
            __builtin_prefetch(at + 2 * ROWS * N);
            const vf wv = widen(at);
            for (int t = 0; t < tokens; t++) acc[r][t] += wv * xv[t];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) {
            float s = hsum(acc[r][t]);
            for (int64_t n = body; n < N; n++) s += widen1(w[(m0 + r) * N + n]) * x[(t0 + t) * N + n];
            y[(t0 + t) * M + m0 + r] = s;
        }
}

void rwkv_bf16_matmul(const float *x, const uint16_t *w, float *y, int64_t T, int64_t N, int64_t M, int threads) {
    const int64_t n_tiles = (M + ROWS - 1) / ROWS;
    for (int64_t t0 = 0; t0 < T; t0 += TOKENS) {
        const int tokens = (int)((t0 + TOKENS <= T) ? TOKENS : T - t0);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n_tiles; i++) {
            const int64_t m0 = i * ROWS;
            const int rows = (int)((m0 + ROWS <= M) ? ROWS : M - m0);
            tile(x, w, y, N, M, m0, rows, t0, tokens);
        }
    }
}
