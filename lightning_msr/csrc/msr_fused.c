/*
 * The per-step work of Mean Shift Rejection in one pass over each weight (lightning_msr.fused).
 *
 * A weight is a sequence of `rows` output filters of `length` contiguous float32 values; a filter is a sequence of
 * kernel groups of `group` values each (the spatial kernels of a conv, or the whole filter). For every filter, in
 * this order and while it is in cache (a resnet's largest filter is 512 x 3 x 3 floats, 18 KiB):
 *
 *   PROJECT   g[k] -= alpha * mean(g[k])                    for each kernel group k of the gradient
 *   CLIP      g *= min(1, clip * max(|w|, eps) / max(|g|, 1e-6))  (unit-wise adaptive clipping, NFNets)
 *   SGD       torch.optim.SGD's update of w (weight decay, momentum/dampening/Nesterov, maximize)
 *   RECENTER  w[k] -= mean(w[k])                            for each kernel group k of the weight
 *   KEEP      w *= target / |w|                             unless target == 0 (a filter left free)
 *
 * With WRITE_GRAD the projected and clipped gradient is written back to `grad`; without it (the SGD step, after
 * which the gradient is not used again) it goes to a per-thread row buffer, and the gradient is only read.
 * Every filter is processed by one thread in a fixed order: the result does not depend on the number of threads,
 * which keeps DDP ranks and resumed runs bit-identical. Long sums are accumulated in double.
 *
 * Interface (called through ctypes, the GIL released): `n` weights, described by `ints[n][8]` =
 * {weight, grad, momentum buffer, target norms (float32, one per row), rows, length, group, flags} (pointers as
 * int64, 0 when unused) and `reals[n][8]` = {alpha, clip, eps, lr, weight_decay, momentum, dampening, unused}.
 */
#include <float.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    PROJECT = 1,
    CLIP = 2,
    SGD = 4,
    MOMENTUM = 8,
    FRESH_BUFFER = 16,
    NESTEROV = 32,
    MAXIMIZE = 64,
    RECENTER = 128,
    KEEP = 256,
    WRITE_GRAD = 512,
};

#define N_INTS 8
#define N_REALS 8
#define MAX_THREADS 256

int msr_fused_abi_version(void) { return 4; }

#define LANES 8

/* Sum of x[0..n) in LANES independent double accumulators (vectorisable without reassociating), then combined in a
 * fixed order: the same bits on every run and every thread count. */
static double sum_of(const float *x, int64_t n) {
    double lanes[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; ++l) lanes[l] += (double)x[i + l];
    double sum = 0.0;
    for (; i < n; ++i) sum += (double)x[i];
    for (int l = 0; l < LANES; ++l) sum += lanes[l];
    return sum;
}

static double sum_of_squares(const float *x, int64_t n) {
    double total = 0.0;
    int64_t i = 0;
#ifdef __AVX2__
    /* two vector accumulators of float products, folded into the double total every 2048 values */
    while (i + 16 <= n) {
        const int64_t stop = i + 2048 < n ? i + 2048 : n - (n - i) % 16;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        for (; i < stop; i += 16) {
            const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
            a = _mm256_fmadd_ps(u, u, a);
            b = _mm256_fmadd_ps(v, v, b);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(a, b));
        for (int l = 0; l < 8; ++l) total += (double)lanes[l];
    }
#endif
    for (; i < n; ++i) total += (double)x[i] * (double)x[i];
    return total;
}

static inline float sum9(const float *q) {
    return (((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]))) + q[8];
}

/* 3x3 kernels (most conv weights), 8 kernels (72 values) at a time: the 8 means are summed in scalar registers,
 * then spread over the 72 values with a permutation per vector of 8, so that the subtraction (and the sum of
 * squares of the result, for the clipping) runs in vector lanes. Returns that sum of squares. */
static double center9(float *x, int64_t length, float alpha) {
    const float scale = (1.0f / 9.0f) * alpha;
    double squares = 0.0;
    int64_t start = 0;
#ifdef __AVX2__
    /* owner[r][c]: which of the 8 kernels value 8 r + c of the block belongs to */
    static const int owner[9][8] = {
        {0, 0, 0, 0, 0, 0, 0, 0}, {0, 1, 1, 1, 1, 1, 1, 1}, {1, 1, 2, 2, 2, 2, 2, 2},
        {2, 2, 2, 3, 3, 3, 3, 3}, {3, 3, 3, 3, 4, 4, 4, 4}, {4, 4, 4, 4, 4, 5, 5, 5},
        {5, 5, 5, 5, 5, 5, 6, 6}, {6, 6, 6, 6, 6, 6, 6, 7}, {7, 7, 7, 7, 7, 7, 7, 7},
    };
    __m256i index[9];
    for (int r = 0; r < 9; ++r) index[r] = _mm256_loadu_si256((const __m256i *)owner[r]);
    __m256 acc = _mm256_setzero_ps();
    for (; start + 72 <= length; start += 72) {
        float *k = x + start;
        float mean[8];
        for (int l = 0; l < 8; ++l) mean[l] = sum9(k + 9 * l) * scale;
        const __m256 means = _mm256_loadu_ps(mean);
        for (int r = 0; r < 9; ++r) {
            const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(k + 8 * r), _mm256_permutevar8x32_ps(means, index[r]));
            _mm256_storeu_ps(k + 8 * r, v);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        if (((start / 72) & 255) == 255) { /* fold into double every 256 blocks */
            float lanes[8];
            _mm256_storeu_ps(lanes, acc);
            for (int l = 0; l < 8; ++l) squares += (double)lanes[l];
            acc = _mm256_setzero_ps();
        }
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; ++l) squares += (double)lanes[l];
#endif
    for (; start < length; start += 9) {
        float *q = x + start;
        const float mean = sum9(q) * scale;
        for (int j = 0; j < 9; ++j) {
            q[j] -= mean;
            squares += (double)q[j] * (double)q[j];
        }
    }
    return squares;
}

/* Centre every group of x; returns the sum of squares of the result. */
static double center(float *x, int64_t length, int64_t group, float alpha) {
    if (group == 9) return center9(x, length, alpha);
    for (int64_t start = 0; start < length; start += group) {
        const float mean = (float)(sum_of(x + start, group) / (double)group) * alpha;
        for (int64_t j = 0; j < group; ++j) x[start + j] -= mean;
    }
    return sum_of_squares(x, length);
}

/* `scratch` (NULL, or room for one row) receives the projected gradient unless it is to be written back: the row
 * is then read from memory once and never written. */
/* Ask for the next filter's values while this one is being computed: the passes over a filter alternate between
 * memory and arithmetic, and this overlaps them. */
static void prefetch_row(const int64_t *ints, int64_t row) {
    const int64_t length = ints[5];
    if (row >= ints[4]) return;
    for (int a = 0; a < 3; ++a) {
        if (!ints[a]) continue;
        const char *p = (const char *)((const float *)(intptr_t)ints[a] + row * length);
        for (int64_t off = 0; off < length * (int64_t)sizeof(float); off += 64) __builtin_prefetch(p + off, 1, 2);
    }
}

static void one_row(const int64_t *ints, const double *reals, int64_t row, float *scratch) {
    const int64_t length = ints[5], group = ints[6], flags = ints[7];
    prefetch_row(ints, row + 1);
    float *w = (float *)(intptr_t)ints[0] + row * length;
    float *g = ints[1] ? (float *)(intptr_t)ints[1] + row * length : 0;
    if (g && scratch && !(flags & WRITE_GRAD)) {
        memcpy(scratch, g, (size_t)length * sizeof(float));
        g = scratch;
    }
    float *buf = ints[2] ? (float *)(intptr_t)ints[2] + row * length : 0;
    const float *target = (const float *)(intptr_t)ints[3];

    double g_squares = -1.0; /* of the projected gradient, once known */
    if (flags & PROJECT) g_squares = center(g, length, group, (float)reals[0]);
    if (flags & CLIP) {
        const float w_norm = (float)sqrt(sum_of_squares(w, length));
        const float g_norm = (float)sqrt(g_squares >= 0.0 ? g_squares : sum_of_squares(g, length));
        const float limit = fmaxf(w_norm, (float)reals[2]) * (float)reals[1];
        const float factor = limit / fmaxf(g_norm, 1e-6f);
        if (factor < 1.0f)
            for (int64_t i = 0; i < length; ++i) g[i] *= factor;
    }
    if (flags & SGD) {
        const float lr = (float)reals[3], decay = (float)reals[4], mu = (float)reals[5];
        const float keep = 1.0f - (float)reals[6];
        const int maximize = (flags & MAXIMIZE) != 0, momentum = (flags & MOMENTUM) != 0;
        const int fresh = (flags & FRESH_BUFFER) != 0, nesterov = (flags & NESTEROV) != 0;
        for (int64_t i = 0; i < length; ++i) {
            float d = maximize ? -g[i] : g[i];
            if (decay != 0.0f) d += decay * w[i];
            if (momentum) {
                const float b = fresh ? d : mu * buf[i] + keep * d;
                buf[i] = b;
                d = nesterov ? d + mu * b : b;
            }
            w[i] -= lr * d;
        }
    }
    if (flags & RECENTER) (void)center(w, length, group, 1.0f);
    if ((flags & KEEP) && target[row] != 0.0f) {
        const float norm = (float)sqrt(sum_of_squares(w, length));
        const float ratio = target[row] / fmaxf(norm, FLT_MIN);
        for (int64_t i = 0; i < length; ++i) w[i] *= ratio;
    }
}

typedef struct {
    int64_t n;
    const int64_t *ints;
    const double *reals;
    int64_t lo, hi; /* this thread's range of elements, over all weights laid end to end */
} job_t;

/* Every row whose first element lies in [lo, hi): each row belongs to exactly one thread. */
static void *run_job(void *arg) {
    const job_t *job = (const job_t *)arg;
    int64_t longest = 0;
    for (int64_t k = 0; k < job->n; ++k)
        if (job->ints[k * N_INTS + 5] > longest) longest = job->ints[k * N_INTS + 5];
    float *scratch = (float *)malloc((size_t)(longest > 0 ? longest : 1) * sizeof(float)); /* NULL: in place */
    int64_t offset = 0;
    for (int64_t k = 0; k < job->n; ++k) {
        const int64_t *ints = job->ints + k * N_INTS;
        const int64_t rows = ints[4], length = ints[5], size = rows * length;
        if (offset + size > job->lo && offset < job->hi && length > 0) {
            int64_t first = job->lo > offset ? (job->lo - offset + length - 1) / length : 0;
            int64_t last = (job->hi - offset + length - 1) / length; /* one past the last row */
            if (last > rows) last = rows;
            for (int64_t r = first; r < last; ++r) one_row(ints, job->reals + k * N_REALS, r, scratch);
        }
        offset += size;
    }
    free(scratch);
    return 0;
}

/* Always completes: a thread that cannot be started has its share run on the calling thread. */
void msr_fused_rows(int64_t n, const int64_t *ints, const double *reals, int64_t threads) {
    int64_t total = 0;
    for (int64_t k = 0; k < n; ++k) total += ints[k * N_INTS + 4] * ints[k * N_INTS + 5];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1 && total / threads < (1 << 15)) threads = total >> 15; /* small work: fewer threads */
    if (threads < 1) threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t t = 0; t < threads; ++t) {
        jobs[t].n = n;
        jobs[t].ints = ints;
        jobs[t].reals = reals;
        jobs[t].lo = total * t / threads;
        jobs[t].hi = total * (t + 1) / threads;
        started[t] = t > 0 && pthread_create(&handles[t], 0, run_job, &jobs[t]) == 0;
    }
    run_job(&jobs[0]);
    for (int64_t t = 1; t < threads; ++t) {
        if (started[t])
            pthread_join(handles[t], 0);
        else
            run_job(&jobs[t]);
    }
}
