/* The MoE router's per-token loops on CPU, in C: moe_infer/model/routing_kernels.py compiles this file on first use
 * and calls it through ctypes. Why: at the paper-shaped models' 64 experts and top-2, torch's CPU topk, the softmax
 * over 2 values and the stable argsort of the pairs cost ~10 us of dispatch per op plus a slow per-row path; here
 * the whole routing of 1024 tokens is one pass of a few tens of microseconds.
 *
 * Shape legend: T tokens, E experts (scores per token), K experts per token, N pairs (T*K, token-major), P keys. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* a ranks above b: NaN above every number, as torch.topk orders them. */
static inline int above(float a, float b) { return a > b || (isnan(a) && !isnan(b)); }

/* The K largest scores of each row, in descending order (ties: the lower column first), and their columns. With
 * `softmax`, values_TK holds the softmax over each row's K values instead (exp(v - v_max) / sum, in fp32). */
void moe_topk(const float *scores_TE, int64_t T, int64_t E, int64_t K, int softmax, float *values_TK,
              int64_t *columns_TK) {
    for (int64_t t = 0; t < T; t++) {
        const float *row = scores_TE + t * E;
        float *value = values_TK + t * K;
        int64_t *column = columns_TK + t * K;
        int64_t held = 0; /* the row's best `held` so far, sorted, in value[0:held] */
        for (int64_t e = 0; e < E; e++) {
            float s = row[e];
            if (held == K && !above(s, value[K - 1])) continue;
            int64_t j = held < K ? held++ : K - 1;
            for (; j > 0 && above(s, value[j - 1]); j--) {
                value[j] = value[j - 1];
                column[j] = column[j - 1];
            }
            value[j] = s;
            column[j] = e;
        }
        if (softmax) {
            float top = value[0], sum = 0.0f;
            for (int64_t j = 0; j < K; j++) sum += value[j] = expf(value[j] - top);
            for (int64_t j = 0; j < K; j++) value[j] /= sum;
        }
    }
}

/* A stable counting sort of N pairs by key (0 <= key < P): order_N[i] is the pair at sorted place i (pairs of equal
 * key keep their order), token_N[i] = order_N[i] / K its token, counts_P the pairs per key. Returns 0, or -1 when a
 * key is out of range (nothing is written to order_N, token_N then) or memory runs out. */
int moe_sort_pairs(const int64_t *key_N, int64_t N, int64_t P, int64_t K, int64_t *counts_P, int64_t *order_N,
                   int64_t *token_N) {
    for (int64_t p = 0; p < P; p++) counts_P[p] = 0;
    for (int64_t n = 0; n < N; n++) {
        int64_t key = key_N[n];
        if (key < 0 || key >= P) return -1;
        counts_P[key]++;
    }
    int64_t *next_P = malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    if (!next_P) return -1;
    int64_t start = 0;
    for (int64_t p = 0; p < P; p++) {
        next_P[p] = start;
        start += counts_P[p];
    }
    for (int64_t n = 0; n < N; n++) {
        int64_t place = next_P[key_N[n]]++;
        order_N[place] = n;
        token_N[place] = n / K;
    }
    free(next_P);
    return 0;
}
