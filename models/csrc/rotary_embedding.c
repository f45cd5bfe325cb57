/* Rotary position embedding of float32 query and key heads in one call.
 *
 * q [B, Hq, T, D] and k [B, Hk, T, D] with any strides but unit-stride features; cos and sin
 * [B, T, R] (R <= D features rotated, the rest passed through as they are), sharing strides.
 * Features pair up as halves (i with i + R/2, Llama's `rotate_half`) or as neighbours (2i with
 * 2i + 1, GPT-J's and Cohere's). Each output is (x * cos) + (partner * sin) with the partner
 * negated in the first of a pair, rounded at each step as torch's three ops round them: built with
 * -ffp-contract=off, so the result is bit-identical to the model's own function. Outputs are
 * written [B, T, H, D] (the layout the projections produced), one task at a time: a decode step's
 * few heads take less than waking a second thread costs, and a prefill chunk's rotation is small
 * next to its projections. `rotary_embedding_into_pool` writes the keys (and copies the values)
 * straight to their slots of a paged KV pool instead, as the lean decode step stores them.
 */
#include <stdint.h>
#include <string.h>

static void rotate_rows(const float *x, int64_t x_b, int64_t x_h, int64_t x_t, int64_t heads, const float *cos,
                        const float *sin, int64_t c_b, int64_t c_t, int64_t B, int64_t T, int64_t D, int64_t R,
                        int interleaved, float *out, const int64_t *slots) {
    const int64_t half = R / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const float *c = cos + b * c_b + t * c_t, *s = sin + b * c_b + t * c_t;
            for (int64_t h = 0; h < heads; h++) {
                const float *row = x + b * x_b + h * x_h + t * x_t;
                float *y = out + ((slots ? slots[b * T + t] : b * T + t) * heads + h) * D;
                if (interleaved) {
                    for (int64_t i = 0; i < R; i += 2) {
                        y[i] = row[i] * c[i] + -row[i + 1] * s[i];
                        y[i + 1] = row[i + 1] * c[i + 1] + row[i] * s[i + 1];
                    }
                } else {
                    for (int64_t i = 0; i < half; i++) y[i] = row[i] * c[i] + -row[i + half] * s[i];
                    for (int64_t i = half; i < R; i++) y[i] = row[i] * c[i] + row[i - half] * s[i];
                }
                for (int64_t i = R; i < D; i++) y[i] = row[i];
            }
        }
}

void rotary_embedding(const float *q, int64_t q_b, int64_t q_h, int64_t q_t, int64_t q_heads, const float *k,
                      int64_t k_b, int64_t k_h, int64_t k_t, int64_t k_heads, const float *cos, const float *sin,
                      int64_t c_b, int64_t c_t, int64_t B, int64_t T, int64_t D, int64_t R, int interleaved,
                      float *q_out, float *k_out) {
    rotate_rows(q, q_b, q_h, q_t, q_heads, cos, sin, c_b, c_t, B, T, D, R, interleaved, q_out, NULL);
    rotate_rows(k, k_b, k_h, k_t, k_heads, cos, sin, c_b, c_t, B, T, D, R, interleaved, k_out, NULL);
}

/* As above for one sequence dimension (B = 1), the T tokens' rotated keys written to the rows
 * `slots[t]` of `k_pool` [slots, k_heads, D] and their values v (token t, head h at v + t * v_t +
 * h * v_h, Dv features) copied to the same rows of `v_pool` [slots, k_heads, Dv]. */
void rotary_embedding_into_pool(const float *q, int64_t q_h, int64_t q_t, int64_t q_heads, const float *k,
                                int64_t k_h, int64_t k_t, int64_t k_heads, const float *v, int64_t v_t,
                                int64_t v_h, const float *cos, const float *sin, int64_t c_t, int64_t T,
                                int64_t D, int64_t R, int64_t Dv, int interleaved, float *q_out,
                                float *k_pool, float *v_pool, const int64_t *slots) {
    rotate_rows(q, 0, q_h, q_t, q_heads, cos, sin, 0, c_t, 1, T, D, R, interleaved, q_out, NULL);
    rotate_rows(k, 0, k_h, k_t, k_heads, cos, sin, 0, c_t, 1, T, D, R, interleaved, k_pool, slots);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < k_heads; h++)
            memcpy(v_pool + (slots[t] * k_heads + h) * Dv, v + t * v_t + h * v_h, (size_t)Dv * sizeof(float));
}
