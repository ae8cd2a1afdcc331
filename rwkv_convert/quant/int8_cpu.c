/* One-token matmul with the rwkv pip package's int8 weights, reading each weight byte once.
 *
 * W[n, m] = (q[n, m] + 0.5) * ry[n] * rx[m] + my[n] + mx[m]     (q: uint8 [N, M], row-major, N = in)
 * y[m]    = sum_n x[n] W[n, m]
 *         = rx[m] * (sum_n (x[n] ry[n]) q[n, m] + 0.5 sum_n x[n] ry[n]) + sum_n x[n] my[n] + mx[m] sum_n x[n]
 *
 * The package dequantises the whole matrix for every token instead; this reads a quarter of the fp32
 * bytes, which is what bounds decoding on a CPU. Columns are split across OpenMP threads. */
#include <stdint.h>
#include <stdlib.h>

void rwkv_int8_gemv(const float *x, const uint8_t *q, const float *mx, const float *rx, const float *my,
                    const float *ry, float *y, int64_t N, int64_t M, int threads) {
    float *xr = (float *)malloc(sizeof(float) * (size_t)N);
    double s_xr = 0.0, s_x = 0.0, s_xmy = 0.0;
    for (int64_t n = 0; n < N; n++) {
        xr[n] = x[n] * ry[n];
        s_xr += xr[n];
        s_x += x[n];
        s_xmy += (double)x[n] * my[n];
    }
    const int64_t block = 256;
    const int64_t n_blocks = (M + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n_blocks; b++) {
        float acc[256];
        const int64_t m0 = b * block;
        const int64_t width = (m0 + block <= M) ? block : M - m0;
        for (int64_t j = 0; j < width; j++) acc[j] = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = q + n * M + m0;
            const float a = xr[n];
            for (int64_t j = 0; j < width; j++) acc[j] += a * (float)row[j];
        }
        for (int64_t j = 0; j < width; j++)
            y[m0 + j] = rx[m0 + j] * (acc[j] + 0.5f * (float)s_xr) + (float)s_xmy + mx[m0 + j] * (float)s_x;
    }
    free(xr);
}
