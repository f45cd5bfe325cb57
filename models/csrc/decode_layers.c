/* The decoder layers of a lean decode step (models/lean_decode.py) as two compiled calls each.
 *
 * A layer of the Llama template is norm -> q/k/v products -> (per-head norms) -> rotary + pool
 * write -> paged attention -> o product -> residual -> norm -> gate/up products -> activation ->
 * product with up -> down product -> residual. Every piece but the activation already runs in
 * this project's C kernels; called one by one from Python, everything in a batch-1 step of the
 * bench model beyond its linear layers and attention (the norm and rotary calls, views, slices,
 * allocations, residual sums) took 1.7-2 ms of a 10-13 ms step (bench.step_split). Here the glue
 * is C and the kernels are the same compiled functions, reached through the pointers
 * models/lean_native.py passes in (`struct kernels`), not copies built with other flags: every
 * value is the one the Python lean step computes. The activation stays with the model's own
 * function (torch's SiLU takes its own vectorised exp in the vector loop and the C library's in
 * the tail; matching that bit for bit in C was not attempted), so a layer is
 * `decode_layers_run(.., index, .., NULL)`, the activation in Python, then
 * `decode_layers_run(.., index + 1, .., activated)`, which finishes the MLP of layer `index` and
 * runs the attention half of the next.
 *
 * What the glue computes itself is exact whatever the order: residual sums (x + o, one rounding
 * each) and the activation times up (one product each), and copies. Built -ffp-contract=off so
 * that no sum and product pair ever fuses into one rounding.
 */
#include <stdint.h>
#include <string.h>

typedef void (*linear_fn)(const float *x, int64_t M, int64_t K, int64_t x_stride, const float *panels,
                          int64_t N, const float *bias, float *y, int64_t y_stride, int threads);
typedef void (*norm_fn)(const float *x, int64_t rows, int64_t dim, int64_t x_stride, const float *weight,
                        float offset, float eps, float *y, int64_t y_stride, int threads);
typedef void (*rotary_fn)(const float *q, int64_t q_h, int64_t q_t, int64_t q_heads, const float *k,
                          int64_t k_h, int64_t k_t, int64_t k_heads, const float *v, int64_t v_t,
                          int64_t v_h, const float *cos, const float *sin, int64_t c_t, int64_t T,
                          int64_t D, int64_t R, int64_t Dv, int interleaved, float *q_out,
                          float *k_pool, float *v_pool, const int64_t *slots);
typedef int (*attention_fn)(const float *q, int64_t q_row, int64_t q_head, const float *k_pool,
                             const float *v_pool, const int64_t *blocks, int64_t blocks_row,
                             const int64_t *first, const int64_t *length, const int64_t *rows,
                             float *out, int64_t num_rows, int heads, int kv_heads, int dim, int dim_v,
                             int block_size, float scale, int threads);

struct kernels {
    linear_fn linear;
    norm_fn norm;
    rotary_fn rotary;
    attention_fn attention;
};

struct product {
    const float *panels; /* NULL: computed by the product before it, side by side */
    const float *bias;   /* NULL: none */
};

struct norm {
    const float *weight; /* NULL: the layer has none */
    float offset;
    float eps;
};

struct layer {
    struct norm attention_norm, mlp_norm, q_norm, k_norm;
    /* q computes q, k and v when k.panels is NULL; gate computes gate and up when up.panels is. */
    struct product q, k, v, o, gate, up, down;
    int64_t hidden, heads, kv_heads, head_dim, value_dim, intermediate;
    float *key_pool, *value_pool;
    float scale;
    int64_t rule; /* which of the step's key ranges its attention reads */
};

/* Decode rows attended together (models.attention.DecodeGroup) under one layer rule. */
struct group {
    const int64_t *blocks;
    int64_t blocks_row;
    const int64_t *first, *length;
    const int64_t *rows; /* NULL: all of the step's rows, in order */
    int64_t count;
};

struct ranges {
    const struct group *groups;
    int64_t count;
};

/* One step: its rows, angles and slots, and where each intermediate lives (models/lean_native.py
 * sizes them for the widest layer). */
struct step {
    int64_t tokens, threads, block_size;
    const float *cos, *sin;
    int64_t cos_row, rotary_dims, interleaved;
    const int64_t *slots;
    const struct ranges *ranges;
    float *x; /* [tokens, hidden], the residual stream, updated in place */
    float *normed, *qkv, *q_normed, *k_normed, *q_rotated, *attended, *projected, *gate_up, *gate, *up,
        *product;
};

static void add_into(float *restrict x, const float *restrict y, int64_t count) {
    for (int64_t i = 0; i < count; i++) x[i] = x[i] + y[i];
}

/* 0, or the attention kernel's error (-1: out of memory), the layer left half done. */
static int attention_half(const struct kernels *kernels, const struct layer *layer, const struct step *step) {
    const int64_t tokens = step->tokens, hidden = layer->hidden, dim = layer->head_dim;
    const int64_t value_dim = layer->value_dim, heads = layer->heads, kv_heads = layer->kv_heads;
    const int threads = (int)step->threads;
    const int64_t q_width = heads * dim, k_width = kv_heads * dim, v_width = kv_heads * value_dim;
    const int64_t width = q_width + k_width + v_width;
    const struct norm *an = &layer->attention_norm;
    kernels->norm(step->x, tokens, hidden, hidden, an->weight, an->offset, an->eps, step->normed, hidden,
                  threads);
    if (layer->k.panels == NULL) {
        kernels->linear(step->normed, tokens, hidden, hidden, layer->q.panels, width, layer->q.bias, step->qkv,
                        width, threads);
    } else {
        kernels->linear(step->normed, tokens, hidden, hidden, layer->q.panels, q_width, layer->q.bias,
                        step->qkv, width, threads);
        kernels->linear(step->normed, tokens, hidden, hidden, layer->k.panels, k_width, layer->k.bias,
                        step->qkv + q_width, width, threads);
        kernels->linear(step->normed, tokens, hidden, hidden, layer->v.panels, v_width, layer->v.bias,
                        step->qkv + q_width + k_width, width, threads);
    }
    const float *q = step->qkv, *k = step->qkv + q_width, *v = step->qkv + q_width + k_width;
    int64_t q_row = width, k_row = width;
    if (layer->q_norm.weight != NULL) {
        const struct norm *qn = &layer->q_norm, *kn = &layer->k_norm;
        for (int64_t t = 0; t < tokens; t++) {
            kernels->norm(step->qkv + t * width, heads, dim, dim, qn->weight, qn->offset, qn->eps,
                          step->q_normed + t * q_width, dim, threads);
            kernels->norm(step->qkv + t * width + q_width, kv_heads, dim, dim, kn->weight, kn->offset, kn->eps,
                          step->k_normed + t * k_width, dim, threads);
        }
        q = step->q_normed, q_row = q_width;
        k = step->k_normed, k_row = k_width;
    }
    kernels->rotary(q, dim, q_row, heads, k, dim, k_row, kv_heads, v, width, value_dim, step->cos, step->sin,
                    step->cos_row, tokens, dim, step->rotary_dims, value_dim, (int)step->interleaved,
                    step->q_rotated, layer->key_pool, layer->value_pool, step->slots);
    const struct ranges *ranges = &step->ranges[layer->rule];
    for (int64_t g = 0; g < ranges->count; g++) {
        const struct group *group = &ranges->groups[g];
        int failed = kernels->attention(step->q_rotated, q_width, dim, layer->key_pool, layer->value_pool,
                                        group->blocks, group->blocks_row, group->first, group->length,
                                        group->rows, step->attended, group->count, (int)heads, (int)kv_heads,
                                        (int)dim, (int)value_dim, (int)step->block_size, layer->scale, threads);
        if (failed) return failed;
    }
    const int64_t attended_width = heads * value_dim;
    kernels->linear(step->attended, tokens, attended_width, attended_width, layer->o.panels, hidden,
                    layer->o.bias, step->projected, hidden, threads);
    add_into(step->x, step->projected, tokens * hidden);
    const struct norm *mn = &layer->mlp_norm;
    kernels->norm(step->x, tokens, hidden, hidden, mn->weight, mn->offset, mn->eps, step->normed, hidden,
                  threads);
    const int64_t inner = layer->intermediate;
    if (layer->up.panels == NULL) {
        kernels->linear(step->normed, tokens, hidden, hidden, layer->gate.panels, 2 * inner, layer->gate.bias,
                        step->gate_up, 2 * inner, threads);
        for (int64_t t = 0; t < tokens; t++) {
            memcpy(step->gate + t * inner, step->gate_up + t * 2 * inner, (size_t)inner * sizeof(float));
            memcpy(step->up + t * inner, step->gate_up + t * 2 * inner + inner, (size_t)inner * sizeof(float));
        }
    } else {
        kernels->linear(step->normed, tokens, hidden, hidden, layer->gate.panels, inner, layer->gate.bias,
                        step->gate, inner, threads);
        kernels->linear(step->normed, tokens, hidden, hidden, layer->up.panels, inner, layer->up.bias, step->up,
                        inner, threads);
    }
    return 0;
}

static void mlp_half(const struct kernels *kernels, const struct layer *layer, const struct step *step,
                     const float *activated) {
    const int64_t tokens = step->tokens, hidden = layer->hidden, inner = layer->intermediate;
    const int64_t count = tokens * inner;
    for (int64_t i = 0; i < count; i++) step->product[i] = activated[i] * step->up[i];
    kernels->linear(step->product, tokens, inner, inner, layer->down.panels, hidden, layer->down.bias,
                    step->projected, hidden, (int)step->threads);
    add_into(step->x, step->projected, tokens * hidden);
}

/* The MLP of layer index - 1 from its activated gate (when `activated` is not NULL), then the
 * attention half of layer `index` up to its gate and up products (when there is one); 0, or the
 * attention kernel's error. */
int decode_layers_run(const struct kernels *kernels, const struct layer *layers, int64_t count, int64_t index,
                      const struct step *step, const float *activated) {
    if (activated != NULL && index > 0) mlp_half(kernels, &layers[index - 1], step, activated);
    return index < count ? attention_half(kernels, &layers[index], step) : 0;
}
