/* The runner's recurrences on the CPU, one token after another as the torch code walks them, without a
 * Python step per token (which is what bounds the torch loop on small and medium models).
 *
 * Same math and layouts as rwkv_convert/arch/v4.py (wkv4), v5.py (wkv, used by v5.x and v6) and v7.py (wkv7):
 * all fp32, contiguous; the state is updated in place (the caller passes a copy). Heads (channels for v4) are
 * split across OpenMP threads: each one's recurrence is independent of the others. */
#include <math.h>
#include <stdint.h>

/* RWKV-4: w = -exp(decay), u [C]; k, v, y [T, C]; aa, bb, pp [C]. */
void rwkv_wkv4(const float *w, const float *u, const float *k, const float *v, float *aa, float *bb, float *pp,
               float *y, int64_t T, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        float a = aa[c], b = bb[c], p = pp[c];
        const float wc = w[c], uc = u[c];
        for (int64_t t = 0; t < T; t++) {
            const float kt = k[t * C + c], vt = v[t * C + c];
            float ww = uc + kt;
            float q = p > ww ? p : ww;
            float e1 = expf(p - q), e2 = expf(ww - q);
            y[t * C + c] = (e1 * a + e2 * vt) / (e1 * b + e2);
            ww = wc + p;
            q = ww > kt ? ww : kt;
            e1 = expf(ww - q);
            e2 = expf(kt - q);
            a = e1 * a + e2 * vt;
            b = e1 * b + e2;
            p = q;
        }
        aa[c] = a;
        bb[c] = b;
        pp[c] = p;
    }
}

/* RWKV-5.x/6: r, k, v, y [T, H, N]; w [T, H, N] (per token, w_per_token = 1) or [H, N]; u [H, N];
 * s [H, N_key, N_value].  y_t = r_t (S + u k_t v_t^T),  S <- diag(w_t) S + k_t v_t^T. */
void rwkv_wkv5(const float *r, const float *k, const float *v, const float *w, const float *u, float *s, float *y,
               int64_t T, int64_t H, int64_t N, int w_per_token, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < H; h++) {
        float *sh = s + h * N * N;
        for (int64_t t = 0; t < T; t++) {
            const int64_t at = (t * H + h) * N;
            const float *rt = r + at, *kt = k + at, *vt = v + at;
            const float *wt = w + (w_per_token ? at : h * N);
            const float *uh = u + h * N;
            float *yt = y + at;
            float bonus = 0.0f;
#pragma omp simd reduction(+ : bonus)
            for (int64_t i = 0; i < N; i++) bonus += rt[i] * uh[i] * kt[i];
            for (int64_t j = 0; j < N; j++) yt[j] = 0.0f;
            for (int64_t i = 0; i < N; i++) {
                float *row = sh + i * N;
                const float ri = rt[i], ki = kt[i], wi = wt[i];
                for (int64_t j = 0; j < N; j++) {
                    yt[j] += ri * row[j];
                    row[j] = row[j] * wi + ki * vt[j];
                }
            }
            for (int64_t j = 0; j < N; j++) yt[j] += bonus * vt[j];
        }
    }
}

/* RWKV-7: r, w, k, v, kk, a, y [T, H, N]; s [H, N_value, N_key].
 * S <- S diag(w_t) + (S (-kk_t)) (kk_t a_t)^T + v_t k_t^T,  y_t = S r_t. */
void rwkv_wkv7(const float *r, const float *w, const float *k, const float *v, const float *kk, const float *a,
               float *s, float *y, int64_t T, int64_t H, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < H; h++) {
        float *sh = s + h * N * N;
        float replace[1024];  /* kk * a for one token and head (head sizes up to 1024) */
        for (int64_t t = 0; t < T; t++) {
            const int64_t at = (t * H + h) * N;
            const float *rt = r + at, *wt = w + at, *kt = k + at, *vt = v + at, *kkt = kk + at, *a_t = a + at;
            for (int64_t j = 0; j < N; j++) replace[j] = kkt[j] * a_t[j];
            for (int64_t i = 0; i < N; i++) {
                float *row = sh + i * N;
                float sa = 0.0f;
#pragma omp simd reduction(+ : sa)
                for (int64_t j = 0; j < N; j++) sa -= row[j] * kkt[j];
                const float vi = vt[i];
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < N; j++) {
                    row[j] = row[j] * wt[j] + (sa * replace[j] + vi * kt[j]);
                    acc += row[j] * rt[j];
                }
                y[at + i] = acc;
            }
        }
    }
}
