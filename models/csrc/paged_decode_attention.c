/* Decode attention over the paged KV pool on CPU, reading the pool's blocks in place.
 *
 * Built and called by models/cpu_attention.py (which says why it exists). One query token per
 * row; its query heads score the row's keys tile by tile with an online softmax (as
 * FlashAttention does), so no gathered copy of the keys and no mask is ever built, and padding to
 * the longest row costs nothing.
 *
 * Layouts (float32):
 *   q      element (row r, head h, dim d) at q[r * q_row + h * q_head + d]
 *   pools  [blocks, block_size, kv_heads, dim] contiguous (dim_v for values)
 *   blocks row i's block table at blocks[i * blocks_row ...]
 *   keys   row i attends to positions first[i] .. length[i] - 1
 *   out    [rows, heads, dim_v] contiguous; row i of this call is rows[i] (or i when rows is NULL)
 * Query head h reads kv head h / (heads / kv_heads), as transformers' repeat_kv lays them out.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64
/* Floats a task keeps on its thread's stack (its query heads' queries, accumulators and a tile
 * of scores): 128 KiB, far below the 2 MiB and more that glibc gives a thread by default. */
#define MAX_TASK_FLOATS 32768

/* Read by models/cpu_attention.py to tell which layouts the kernel takes. */
const int paged_decode_attention_max_task_floats = MAX_TASK_FLOATS;
const int paged_decode_attention_tile = TILE;

/* exp(x) for x <= 0, within a few ulp of expf (Cephes' polynomial, Cody-Waite reduction); written
 * so that the compiler vectorizes the loops calling it. Inputs below -87 give exp(-87) (~1e-38),
 * nothing against the weight 1 of the row's largest score. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + shifter;
    float n = t - shifter;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    int32_t shifter_bits;
    memcpy(&shifter_bits, &shifter, sizeof shifter_bits);
    int32_t scale_bits = (bits - shifter_bits + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

/* Where a row's entries for kv heads kv_first.. of `position` start in `pool` (`width` floats a head). */
static inline const float *at_position(const float *pool, const int64_t *table, int64_t position,
                                       int block_size, int kv_heads, int kv_first, int width) {
    int64_t slot = table[position / block_size] * block_size + position % block_size;
    return pool + (slot * kv_heads + kv_first) * width;
}

/* One task: row `table`'s query heads of kv heads [kv_first, kv_first + kv_count) over positions
 * first .. length - 1. A position's keys for those heads lie next to each other in its block, so
 * reading all of them per position walks each block front to back. With `partial` NULL it writes
 * the heads' outputs to `out`; else, for a span of a longer row, each head's running maximum, sum
 * and unnormalised accumulator to `partial` (`merge` combines them). */
static void attend(const float *q, int64_t q_head, const float *k_pool, const float *v_pool,
                   const int64_t *table, int64_t first, int64_t length, int group, int kv_first,
                   int kv_count, int kv_heads, int dim, int dim_v, int block_size, float scale,
                   float *out, float *partial) {
    const int heads = kv_count * group; /* this task's query heads, in order */
    float qs[heads][dim];
    float acc[heads][dim_v];
    float scores[heads][TILE];
    float running_max[heads];
    float running_sum[heads];
    for (int h = 0; h < heads; h++) {
        for (int d = 0; d < dim; d++) qs[h][d] = q[h * q_head + d] * scale;
        for (int d = 0; d < dim_v; d++) acc[h][d] = 0.0f;
        running_max[h] = -FLT_MAX;
        running_sum[h] = 0.0f;
    }
    for (int64_t start = first; start < length; start += TILE) {
        int n = (int)(length - start < TILE ? length - start : TILE);
        for (int j = 0; j < n; j++) {
            const float *keys = at_position(k_pool, table, start + j, block_size, kv_heads, kv_first, dim);
            for (int h = 0; h < heads; h++) {
                const float *key = keys + (h / group) * dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < dim; d++) dot += qs[h][d] * key[d];
                scores[h][j] = dot;
            }
        }
        for (int h = 0; h < heads; h++) {
            float tile_max = -FLT_MAX;
#pragma omp simd reduction(max : tile_max)
            for (int j = 0; j < n; j++) tile_max = scores[h][j] > tile_max ? scores[h][j] : tile_max;
            float new_max = tile_max > running_max[h] ? tile_max : running_max[h];
            float correction = exp_nonpositive(running_max[h] - new_max);
            running_sum[h] *= correction;
            for (int d = 0; d < dim_v; d++) acc[h][d] *= correction;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < n; j++) {
                float p = exp_nonpositive(scores[h][j] - new_max);
                scores[h][j] = p;
                sum += p;
            }
            running_sum[h] += sum;
            running_max[h] = new_max;
        }
        for (int j = 0; j < n; j++) {
            const float *values =
                at_position(v_pool, table, start + j, block_size, kv_heads, kv_first, dim_v);
            for (int h = 0; h < heads; h++) {
                const float *value = values + (h / group) * dim_v;
                float p = scores[h][j];
#pragma omp simd
                for (int d = 0; d < dim_v; d++) acc[h][d] += p * value[d];
            }
        }
    }
    if (partial != NULL) {
        for (int h = 0; h < heads; h++) {
            float *record = partial + (int64_t)h * (dim_v + 2);
            record[0] = running_max[h];
            record[1] = running_sum[h];
            memcpy(record + 2, acc[h], (size_t)dim_v * sizeof(float));
        }
        return;
    }
    for (int h = 0; h < heads; h++) {
        float inverse = running_sum[h] > 0.0f ? 1.0f / running_sum[h] : 0.0f;
        for (int d = 0; d < dim_v; d++) out[(int64_t)h * dim_v + d] = acc[h][d] * inverse;
    }
}

/* A row's heads from the records of its `spans` spans, in order: each rescaled to the largest
 * maximum among them, summed, normalised. */
static void merge(const float *partials, int spans, int heads, int dim_v, float *out) {
    const int64_t record = dim_v + 2, span_stride = (int64_t)heads * record;
    for (int h = 0; h < heads; h++) {
        float top = -FLT_MAX;
        for (int s = 0; s < spans; s++) {
            float m = partials[s * span_stride + h * record];
            top = m > top ? m : top;
        }
        float total = 0.0f;
        float *row_out = out + (int64_t)h * dim_v;
        for (int d = 0; d < dim_v; d++) row_out[d] = 0.0f;
        for (int s = 0; s < spans; s++) {
            const float *r = partials + s * span_stride + h * record;
            float weight = exp_nonpositive(r[0] - top);
            total += r[1] * weight;
            for (int d = 0; d < dim_v; d++) row_out[d] += r[2 + d] * weight;
        }
        float inverse = total > 0.0f ? 1.0f / total : 0.0f;
        for (int d = 0; d < dim_v; d++) row_out[d] *= inverse;
    }
}

/* Tasks: a row's keys in spans of SPAN positions, all of its kv heads in each (more tasks only
 * where a task's heads would not fit its stack). A row of at most SPAN keys is one task that
 * writes its output directly; a longer row's spans write partial records that `merge` combines,
 * so a long context is read by every thread, and a row's result depends only on its own keys,
 * never on which rows share the call. Splitting a row's kv heads over threads instead, as this
 * kernel once did for fewer rows than threads, was slower at every length measured on a 2-core
 * machine (docs/BENCHMARKS.md: one row of the bench model at about 1000 keys took 6.8-7.5 ms of
 * attention a step, 3.0-3.2 on one thread). A single task runs on the calling thread. */
#define SPAN 512

static int spans_of(int64_t first, int64_t length) {
    int64_t keys = length - first;
    return keys <= SPAN ? 1 : (int)((keys + SPAN - 1) / SPAN);
}

/* Scratch for the partial records, kept per calling thread and grown when a call needs more. */
static __thread float *scratch;
static __thread int64_t scratch_floats;

/* 0, or -1 when the records' scratch could not be allocated (nothing written). */
int paged_decode_attention(const float *q, int64_t q_row, int64_t q_head, const float *k_pool,
                           const float *v_pool, const int64_t *blocks, int64_t blocks_row,
                           const int64_t *first, const int64_t *length, const int64_t *rows,
                           float *out, int64_t num_rows, int heads, int kv_heads, int dim,
                           int dim_v, int block_size, float scale, int threads) {
    int group = heads / kv_heads;
    int per_split = MAX_TASK_FLOATS / (group * (dim + dim_v + TILE));
    per_split = per_split < 1 ? 1 : (per_split > kv_heads ? kv_heads : per_split);
    int splits = (kv_heads + per_split - 1) / per_split;
    int most_spans = 1;
    for (int64_t i = 0; i < num_rows; i++) {
        int spans = spans_of(first[i], length[i]);
        most_spans = spans > most_spans ? spans : most_spans;
    }
    /* Row i's span s keeps its heads' records at ((i * most_spans) + s) * record floats in. */
    const int64_t record = (int64_t)heads * (dim_v + 2);
    const int64_t needed = most_spans > 1 ? num_rows * most_spans * record : 0;
    if (needed > scratch_floats) {
        float *grown = realloc(scratch, (size_t)needed * sizeof(float));
        if (grown == NULL) return -1;
        scratch = grown, scratch_floats = needed;
    }
    float *partials = scratch;
    if (num_rows * most_spans * splits == 1) threads = 1;
#pragma omp parallel for collapse(3) schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < num_rows; i++) {
        for (int span = 0; span < most_spans; span++) {
            for (int split = 0; split < splits; split++) {
                const int spans = spans_of(first[i], length[i]);
                if (span >= spans) continue;
                int kv_first = split * per_split;
                int kv_count = kv_heads - kv_first < per_split ? kv_heads - kv_first : per_split;
                int64_t row = rows ? rows[i] : i;
                int64_t head = (int64_t)kv_first * group;
                int64_t start = first[i] + (int64_t)span * SPAN;
                int64_t end = span == spans - 1 ? length[i] : start + SPAN;
                float *partial =
                    spans == 1 ? NULL : partials + (i * most_spans + span) * record + head * (dim_v + 2);
                attend(q + row * q_row + head * q_head, q_head, k_pool, v_pool, blocks + i * blocks_row,
                       start, end, group, kv_first, kv_count, kv_heads, dim, dim_v, block_size, scale,
                       out + (row * heads + head) * dim_v, partial);
            }
        }
    }
    if (most_spans > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
        for (int64_t i = 0; i < num_rows; i++) {
            int spans = spans_of(first[i], length[i]);
            if (spans == 1) continue;
            int64_t row = rows ? rows[i] : i;
            merge(partials + i * most_spans * record, spans, heads, dim_v, out + row * heads * dim_v);
        }
    }
    return 0;
}
