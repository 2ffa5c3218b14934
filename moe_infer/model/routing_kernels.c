/* The MoE router's per-token loops on CPU, in C: moe_infer/model/routing_kernels.py compiles this file on first use
 * and calls it through ctypes (why: see there).
 *
 * Order of scores, as torch.topk's: NaN ranks above every number; equal scores (which torch leaves in no set order)
 * rank by column, the lower first.
 *
 * Shape legend: T tokens, E experts (scores per token), K experts per token, N pairs (T*K, token-major), P keys. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* a ranks above b (NaN above every number). */
static inline int above(float a, float b) { return a > b || (isnan(a) && !isnan(b)); }

/* Any row: one pass, each score inserted into the K best so far. */
static void topk_row_scalar(const float *row, int64_t E, int64_t K, float *value, int64_t *column) {
    int64_t held = 0;
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
}

#ifdef __SSE2__
/* The lanes of s that rank below (limit, last): a smaller score, or an equal one in a later column. */
static inline __m128 below(__m128 s, __m128i col, __m128 limit, __m128i last) {
    __m128 later = _mm_castsi128_ps(_mm_cmpgt_epi32(col, last));
    return _mm_or_ps(_mm_cmplt_ps(s, limit), _mm_and_ps(_mm_cmpeq_ps(s, limit), later));
}

/* A row of a multiple of 4 scores without NaN, 4 scores per instruction: K passes over the row, pass j taking the
 * largest score that ranks below pass j - 1's and its first column. 2.4x faster than the scalar loop at E = 64, K = 2
 * (117 against 280 us for 1024 rows, one core). Returns 0, having written nothing, for a row with a NaN. */
static int topk_row_sse2(const float *row, int64_t E, int64_t K, float *value, int64_t *column) {
    const __m128 minus_inf = _mm_set1_ps(-INFINITY);
    const __m128i four = _mm_set1_epi32(4), first_cols = _mm_setr_epi32(0, 1, 2, 3);
    __m128 limit = _mm_set1_ps(INFINITY);
    __m128i last = _mm_set1_epi32(-1);
    for (int64_t j = 0; j < K; j++) {
        __m128 best = minus_inf;
        __m128i col = first_cols;
        if (j == 0) { /* every score ranks below (+inf, -1); a NaN anywhere sends the row to the scalar loop */
            __m128 nan = _mm_setzero_ps();
            for (int64_t e = 0; e < E; e += 4) {
                __m128 s = _mm_loadu_ps(row + e);
                nan = _mm_or_ps(nan, _mm_cmpunord_ps(s, s));
                best = _mm_max_ps(best, s);
            }
            if (_mm_movemask_ps(nan)) return 0;
        } else {
            for (int64_t e = 0; e < E; e += 4, col = _mm_add_epi32(col, four)) {
                __m128 s = _mm_loadu_ps(row + e), ok = below(s, col, limit, last);
                best = _mm_max_ps(best, _mm_or_ps(_mm_and_ps(ok, s), _mm_andnot_ps(ok, minus_inf)));
            }
        }
        best = _mm_max_ps(best, _mm_shuffle_ps(best, best, _MM_SHUFFLE(2, 3, 0, 1)));
        best = _mm_max_ps(best, _mm_shuffle_ps(best, best, _MM_SHUFFLE(1, 0, 3, 2))); /* the top in every lane */
        int64_t found = 0;
        col = first_cols;
        for (int64_t e = 0; e < E; e += 4, col = _mm_add_epi32(col, four)) {
            __m128 s = _mm_loadu_ps(row + e);
            int hit = _mm_movemask_ps(_mm_and_ps(below(s, col, limit, last), _mm_cmpeq_ps(s, best)));
            if (hit) {
                found = e + __builtin_ctz((unsigned)hit);
                break;
            }
        }
        value[j] = _mm_cvtss_f32(best);
        column[j] = found;
        limit = best;
        last = _mm_set1_epi32((int32_t)found);
    }
    return 1;
}
#endif

/* The K largest scores of each row, in descending order, and their columns. With `softmax`, values_TK holds the
 * softmax over each row's K values instead (exp(v - v_max) / sum, in fp32). */
void moe_topk(const float *scores_TE, int64_t T, int64_t E, int64_t K, int softmax, float *values_TK,
              int64_t *columns_TK) {
    for (int64_t t = 0; t < T; t++) {
        const float *row = scores_TE + t * E;
        float *value = values_TK + t * K;
        int64_t *column = columns_TK + t * K;
#ifdef __SSE2__
        if (E % 4 || E > INT32_MAX || !topk_row_sse2(row, E, K, value, column))
#endif
            topk_row_scalar(row, E, K, value, column);
        if (softmax) {
            float top = value[0], sum = 0.0f;
            for (int64_t j = 0; j < K; j++) sum += value[j] = expf(value[j] - top);
            for (int64_t j = 0; j < K; j++) value[j] /= sum;
        }
    }
}

/* A stable counting sort of N pairs by key (0 <= key < P): order_N[i] is the pair at sorted place i (pairs of equal
 * key keep their order), token_N[i] = order_N[i] / K its token, place_N[n] the sorted place of pair n (the inverse of
 * order_N), counts_P the pairs per key. Returns 0, or -1 when a key is out of range (nothing is written to order_N,
 * token_N, place_N then) or memory runs out. */
int moe_sort_pairs(const int64_t *key_N, int64_t N, int64_t P, int64_t K, int64_t *counts_P, int64_t *order_N,
                   int64_t *token_N, int64_t *place_N) {
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
        place_N[n] = place;
    }
    free(next_P);
    return 0;
}

/* Each token's K rows summed: out_TD[t] = y_MD[place_N[t*K]] + ... + y_MD[place_N[t*K + K-1]], added in that order.
 * One pass that writes each output row once (zeros then index_add_ write it K + 1 times). Returns 0, or -1 when a
 * place lies outside [0, M) (checked before anything is written). */
int moe_sum_pairs(const float *restrict y_MD, int64_t M, const int64_t *restrict place_N, int64_t T, int64_t K,
                  int64_t D, float *restrict out_TD) {
    for (int64_t n = 0; n < T * K; n++)
        if (place_N[n] < 0 || place_N[n] >= M) return -1;
    for (int64_t t = 0; t < T; t++) {
        float *restrict out = out_TD + t * D;
        const int64_t *place = place_N + t * K;
        const float *first = y_MD + place[0] * D;
        if (K == 1) {
            memcpy(out, first, (size_t)D * sizeof(float));
            continue;
        }
        const float *second = y_MD + place[1] * D;
        for (int64_t d = 0; d < D; d++) out[d] = first[d] + second[d];
        for (int64_t k = 2; k < K; k++) {
            const float *row = y_MD + place[k] * D;
            for (int64_t d = 0; d < D; d++) out[d] += row[d];
        }
    }
    return 0;
}
