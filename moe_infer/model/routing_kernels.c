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
/* x86-64 Linux with GCC or clang: the AVX2 loops below, chosen at run time on CPUs that have AVX2 (the build itself
 * assumes only the baseline x86-64: the library may be cached on a shared disk and loaded by an older CPU). Other
 * CPUs take the scalar loops. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#define AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AVX2_CLONES
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

#ifdef HAVE_AVX2_PATH
/* The lanes of s that rank below (limit, last): a smaller score, or an equal one in a later column. */
__attribute__((target("avx2"))) static inline __m256 below(__m256 s, __m256i col, __m256 limit, __m256i last) {
    __m256 later = _mm256_castsi256_ps(_mm256_cmpgt_epi32(col, last));
    return _mm256_or_ps(_mm256_cmp_ps(s, limit, _CMP_LT_OQ), _mm256_and_ps(_mm256_cmp_ps(s, limit, _CMP_EQ_OQ), later));
}

/* A row of a multiple of 8 scores without NaN, 8 scores per instruction: K passes over the row, pass j taking the
 * largest score that ranks below pass j - 1's and its first column. At E = 64, K = 2 (1024 rows, one core): 4-wide
 * (SSE2) 117 us against 280 for the scalar loop; 8-wide 115 against 150 for 4-wide, warm, 61 interleaved rounds.
 * Returns 0, having written nothing, for a row with a NaN. */
__attribute__((target("avx2"))) static int topk_row_avx2(const float *row, int64_t E, int64_t K, float *value,
                                                         int64_t *column) {
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    const __m256i eight = _mm256_set1_epi32(8), first_cols = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 limit = _mm256_set1_ps(INFINITY);
    __m256i last = _mm256_set1_epi32(-1);
    for (int64_t j = 0; j < K; j++) {
        __m256 best = minus_inf;
        __m256i col = first_cols;
        if (j == 0) {
            __m256 nan = _mm256_setzero_ps();
            for (int64_t e = 0; e < E; e += 8) {
                __m256 s = _mm256_loadu_ps(row + e);
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
                best = _mm256_max_ps(best, s);
            }
            if (_mm256_movemask_ps(nan)) return 0;
        } else {
            for (int64_t e = 0; e < E; e += 8, col = _mm256_add_epi32(col, eight)) {
                __m256 s = _mm256_loadu_ps(row + e);
                best = _mm256_max_ps(best, _mm256_blendv_ps(minus_inf, s, below(s, col, limit, last)));
            }
        }
        best = _mm256_max_ps(best, _mm256_permute2f128_ps(best, best, 1));
        best = _mm256_max_ps(best, _mm256_shuffle_ps(best, best, _MM_SHUFFLE(2, 3, 0, 1)));
        best = _mm256_max_ps(best, _mm256_shuffle_ps(best, best, _MM_SHUFFLE(1, 0, 3, 2))); /* the top in every lane */
        int64_t found = 0;
        col = first_cols;
        for (int64_t e = 0; e < E; e += 8, col = _mm256_add_epi32(col, eight)) {
            __m256 s = _mm256_loadu_ps(row + e);
            __m256 top = _mm256_cmp_ps(s, best, _CMP_EQ_OQ);
            int hit = _mm256_movemask_ps(_mm256_and_ps(below(s, col, limit, last), top));
            if (hit) {
                found = e + __builtin_ctz((unsigned)hit);
                break;
            }
        }
        value[j] = _mm256_cvtss_f32(best);
        column[j] = found;
        limit = best;
        last = _mm256_set1_epi32((int32_t)found);
    }
    return 1;
}
#endif

/* Whether rows of E scores take topk_row_avx2 on this CPU. */
static int use_avx2_topk(int64_t E) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init(); /* idempotent; the CPU's features are read before any constructor order is known */
    return E % 8 == 0 && E <= INT32_MAX && __builtin_cpu_supports("avx2");
#else
    (void)E;
    return 0;
#endif
}

/* One row's K largest scores and their columns (the fastest loop that can take the row), or their softmax. */
static void topk_row(const float *row, int64_t E, int64_t K, int softmax, int avx2, float *value, int64_t *column) {
    int done = 0;
#ifdef HAVE_AVX2_PATH
    if (avx2) done = topk_row_avx2(row, E, K, value, column);
#else
    (void)avx2;
#endif
    if (!done) topk_row_scalar(row, E, K, value, column);
    if (softmax) {
        float top = value[0], sum = 0.0f;
        for (int64_t j = 0; j < K; j++) sum += value[j] = expf(value[j] - top);
        for (int64_t j = 0; j < K; j++) value[j] /= sum;
    }
}

/* The K largest scores of each row, in descending order, and their columns. With `softmax`, values_TK holds the
 * softmax over each row's K values instead (exp(v - v_max) / sum, in fp32). */
void moe_topk(const float *scores_TE, int64_t T, int64_t E, int64_t K, int softmax, float *values_TK,
              int64_t *columns_TK) {
    int avx2 = use_avx2_topk(E);
    for (int64_t t = 0; t < T; t++)
        topk_row(scores_TE + t * E, E, K, softmax, avx2, values_TK + t * K, columns_TK + t * K);
}

#ifdef HAVE_AVX2_PATH
#define ROUTE_ROWS 6 /* tokens per pass of the logits loop: 6 x 2 accumulators, 2 weight vectors, 1 broadcast */

/* logits_RE = x_RD W for ROUTE_ROWS rows of x (row stride D), W given transposed (w_DE: [D, E], E a multiple of 8):
 * 16 experts at a time, each weight vector loaded once for all the rows. Each logit is one FMA chain over d in
 * order. */
__attribute__((target("avx2,fma"))) static void logits_rows_avx2(const float *x_RD, int64_t D, const float *w_DE,
                                                                 int64_t E, float *logits_RE) {
    int64_t e0 = 0;
    for (; e0 + 16 <= E; e0 += 16) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
        __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
        const float *w = w_DE + e0;
        for (int64_t d = 0; d < D; d++, w += E) {
            __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8), xd;
            xd = _mm256_broadcast_ss(x_RD + d);
            a00 = _mm256_fmadd_ps(xd, w0, a00), a01 = _mm256_fmadd_ps(xd, w1, a01);
            xd = _mm256_broadcast_ss(x_RD + D + d);
            a10 = _mm256_fmadd_ps(xd, w0, a10), a11 = _mm256_fmadd_ps(xd, w1, a11);
            xd = _mm256_broadcast_ss(x_RD + 2 * D + d);
            a20 = _mm256_fmadd_ps(xd, w0, a20), a21 = _mm256_fmadd_ps(xd, w1, a21);
            xd = _mm256_broadcast_ss(x_RD + 3 * D + d);
            a30 = _mm256_fmadd_ps(xd, w0, a30), a31 = _mm256_fmadd_ps(xd, w1, a31);
            xd = _mm256_broadcast_ss(x_RD + 4 * D + d);
            a40 = _mm256_fmadd_ps(xd, w0, a40), a41 = _mm256_fmadd_ps(xd, w1, a41);
            xd = _mm256_broadcast_ss(x_RD + 5 * D + d);
            a50 = _mm256_fmadd_ps(xd, w0, a50), a51 = _mm256_fmadd_ps(xd, w1, a51);
        }
        float *out = logits_RE + e0;
        _mm256_storeu_ps(out, a00), _mm256_storeu_ps(out + 8, a01), out += E;
        _mm256_storeu_ps(out, a10), _mm256_storeu_ps(out + 8, a11), out += E;
        _mm256_storeu_ps(out, a20), _mm256_storeu_ps(out + 8, a21), out += E;
        _mm256_storeu_ps(out, a30), _mm256_storeu_ps(out + 8, a31), out += E;
        _mm256_storeu_ps(out, a40), _mm256_storeu_ps(out + 8, a41), out += E;
        _mm256_storeu_ps(out, a50), _mm256_storeu_ps(out + 8, a51);
    }
    if (e0 < E) { /* the last 8 experts of an odd multiple of 8 */
        __m256 a[ROUTE_ROWS];
        for (int r = 0; r < ROUTE_ROWS; r++) a[r] = _mm256_setzero_ps();
        const float *w = w_DE + e0;
        for (int64_t d = 0; d < D; d++, w += E) {
            __m256 w0 = _mm256_loadu_ps(w);
            for (int r = 0; r < ROUTE_ROWS; r++)
                a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x_RD + r * D + d), w0, a[r]);
        }
        for (int r = 0; r < ROUTE_ROWS; r++) _mm256_storeu_ps(logits_RE + r * E + e0, a[r]);
    }
}
#endif

/* The router in one call: the E logits of each token (x_TD W^T + bias, W given transposed: w_DE [D, E]; bias_E may
 * be NULL), computed ROUTE_ROWS tokens at a time into a scratch that stays in L1, then their top K as moe_topk.
 * Returns 0, or -1 (nothing written) where this CPU or E cannot take the AVX2 loop (E a multiple of 8, AVX2 and
 * FMA), K is not in [1, E], or memory runs out. */
int moe_route(const float *x_TD, int64_t T, int64_t D, const float *w_DE, const float *bias_E, int64_t E, int64_t K,
              int softmax, float *values_TK, int64_t *columns_TK) {
#ifdef HAVE_AVX2_PATH
    if (K < 1 || K > E || E % 8 || !use_avx2_topk(E) || !__builtin_cpu_supports("fma")) return -1;
    float *logits_RE = malloc((size_t)(ROUTE_ROWS * E + ROUTE_ROWS * D) * sizeof(float));
    if (!logits_RE) return -1;
    float *tail_RD = logits_RE + ROUTE_ROWS * E; /* the last tokens, padded with zeros to ROUTE_ROWS rows */
    for (int64_t t0 = 0; t0 < T; t0 += ROUTE_ROWS) {
        int64_t rows = T - t0 < ROUTE_ROWS ? T - t0 : ROUTE_ROWS;
        const float *x_RD = x_TD + t0 * D;
        if (rows < ROUTE_ROWS) {
            memset(tail_RD, 0, (size_t)(ROUTE_ROWS * D) * sizeof(float));
            memcpy(tail_RD, x_RD, (size_t)(rows * D) * sizeof(float));
            x_RD = tail_RD;
        }
        logits_rows_avx2(x_RD, D, w_DE, E, logits_RE);
        for (int64_t r = 0; r < rows; r++) {
            float *logits_E = logits_RE + r * E;
            if (bias_E)
                for (int64_t e = 0; e < E; e++) logits_E[e] += bias_E[e];
            topk_row(logits_E, E, K, softmax, 1, values_TK + (t0 + r) * K, columns_TK + (t0 + r) * K);
        }
    }
    free(logits_RE);
    return 0;
#else
    (void)x_TD, (void)T, (void)D, (void)w_DE, (void)bias_E, (void)E, (void)K, (void)softmax, (void)values_TK;
    (void)columns_TK;
    return -1;
#endif
}

/* A stable counting sort of N pairs by key (0 <= key < P): counts_P the pairs per key, place_N[n] the sorted place of
 * pair n and, unless NULL, order_N[i] the pair at sorted place i (its inverse) and token_N[i] = order_N[i] / K its
 * token. Returns 0, or -1 when a key is out of range (nothing is written but counts_P then) or memory runs out. */
static int sort_by_key(const int64_t *key_N, int64_t N, int64_t P, int64_t K, int64_t *counts_P, int64_t *order_N,
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
        place_N[n] = place;
        if (order_N) order_N[place] = n;
        if (token_N) token_N[place] = n / K;
    }
    free(next_P);
    return 0;
}

/* The pairs sorted by key (sort_by_key, every output). Returns 0, or -1 when a key is out of range (nothing is
 * written to order_N, token_N, place_N then) or memory runs out. */
int moe_sort_pairs(const int64_t *key_N, int64_t N, int64_t P, int64_t K, int64_t *counts_P, int64_t *order_N,
                   int64_t *token_N, int64_t *place_N) {
    return sort_by_key(key_N, N, P, K, counts_P, order_N, token_N, place_N);
}

/* One rank's whole routing in one call, every expert local at its own id: moe_route (the K experts of each token and
 * their probabilities, probs_TK and experts_TK), the pairs sorted by expert (counts_E, place_N as moe_sort_pairs),
 * and each pair's row of x_TD and probability copied to its sorted place (x_ND, probs_N): what the experts read.
 * Returns 0, or -1 where moe_route cannot run (nothing written then) or memory runs out. */
int moe_route_rows(const float *x_TD, int64_t T, int64_t D, const float *w_DE, const float *bias_E, int64_t E,
                   int64_t K, float *probs_TK, int64_t *experts_TK, int64_t *counts_E, int64_t *place_N, float *x_ND,
                   float *probs_N) {
    if (moe_route(x_TD, T, D, w_DE, bias_E, E, K, 1, probs_TK, experts_TK) != 0) return -1;
    if (sort_by_key(experts_TK, T * K, E, K, counts_E, NULL, NULL, place_N) != 0) return -1;
    for (int64_t n = 0; n < T * K; n++) {
        int64_t place = place_N[n];
        probs_N[place] = probs_TK[n];
        memcpy(x_ND + place * D, x_TD + (n / K) * D, (size_t)D * sizeof(float));
    }
    return 0;
}

/* Each token's K rows summed: out_TD[t] = y_MD[place_N[t*K]] + ... + y_MD[place_N[t*K + K-1]], added in that order.
 * One pass that writes each output row once (zeros then index_add_ write it K + 1 times). Returns 0, or -1 when a
 * place lies outside [0, M) (checked before anything is written). */
AVX2_CLONES int moe_sum_pairs(const float *restrict y_MD, int64_t M, const int64_t *restrict place_N, int64_t T,
                              int64_t K, int64_t D, float *restrict out_TD) {
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
