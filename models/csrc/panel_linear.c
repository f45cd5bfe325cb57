/* y = x W^T + bias for float32 CPU linears, W stored as panels of 16 output features.
 *
 * panels[p][k][j] = W[16 p + j][k] (features past N are zero), so that one 64-byte load gives
 * the weights of 16 outputs for one input feature and every x[m][k] multiplies it with one
 * broadcast FMA: no horizontal sums, each weight read once per tile of input rows, the weights
 * streamed front to back. A tile keeps rows x panels accumulators in registers (up to 4 rows by
 * 4 panels for decode-sized inputs, 8 rows by 2 panels above); tiles of panels are split over the
 * threads, each running its panels' whole K for every row; above 8 rows, in K blocks small enough
 * that a block of its panels stays in the L2 cache while all the rows pass over it.
 *
 * Every output is one chain of FMAs over k = 0..K-1 in order (a K block resumes from the value
 * the previous one stored), then + bias: a row's result does not depend on which other rows, or
 * how many, share the call, so batching leaves greedy outputs bit-identical.
 */
#include <immintrin.h>
#include <stdint.h>

#ifndef __AVX512F__
#error "panel_linear needs AVX-512F"
#endif

#define LANES 16
/* 2 panels x 2048 inputs x 64 bytes: 256 KB of weights stay in L2 while the rows pass. */
#define K_BLOCK 2048

const int panel_linear_lanes = LANES;

static inline __attribute__((always_inline)) void tile(const float *restrict x, int64_t x_stride,
                                                       const float *restrict panels, int64_t K,
                                                       int64_t k0, int64_t k1, int64_t first_panel,
                                                       int panel_count, const int rows_max,
                                                       const int panels_max,
                                                       const float *restrict bias, float *restrict y,
                                                       int64_t y_stride, int64_t N) {
    __m512 acc[8][4];
    const int64_t column0 = first_panel * LANES;
    __mmask16 masks[4];
    for (int j = 0; j < panels_max; j++) {
        int64_t width = N - (column0 + j * LANES);
        width = j < panel_count ? (width < LANES ? width : LANES) : 0;
        masks[j] = (__mmask16)((1u << width) - 1u);
    }
    for (int m = 0; m < rows_max; m++)
        for (int j = 0; j < panels_max; j++)
            acc[m][j] = k0 == 0 ? _mm512_setzero_ps()
                                : _mm512_maskz_loadu_ps(masks[j], y + m * y_stride + column0 + j * LANES);
    const float *w[4];
    for (int j = 0; j < panels_max; j++)
        w[j] = panels + (first_panel + (j < panel_count ? j : 0)) * K * LANES;
    for (int64_t k = k0; k < k1; k++) {
        __m512 wk[4];
        for (int j = 0; j < panels_max; j++) wk[j] = _mm512_loadu_ps(w[j] + k * LANES);
        _Pragma("GCC unroll 8") for (int m = 0; m < rows_max; m++) {
            __m512 xm = _mm512_set1_ps(x[m * x_stride + k]);
            for (int j = 0; j < panels_max; j++) acc[m][j] = _mm512_fmadd_ps(xm, wk[j], acc[m][j]);
        }
    }
    const int last = k1 == K;
    for (int j = 0; j < panels_max; j++) {
        __m512 b = last && bias ? _mm512_maskz_loadu_ps(masks[j], bias + column0 + j * LANES)
                                : _mm512_setzero_ps();
        for (int m = 0; m < rows_max; m++)
            _mm512_mask_storeu_ps(y + m * y_stride + column0 + j * LANES, masks[j],
                                  last && bias ? _mm512_add_ps(acc[m][j], b) : acc[m][j]);
    }
}

#define TILE(ROWS, PANELS)                                                           \
    tile(x + m0 * x_stride, x_stride, panels, K, k0, k1, p, panel_count, ROWS, PANELS, bias, y + m0 * y_stride, y_stride, N)

/* x: [M, K] rows `x_stride` floats apart; panels: [ceil(N / 16), K, 16]; y: [M, N] rows
 * `y_stride` floats apart; bias: [N] or NULL. */
void panel_linear(const float *x, int64_t M, int64_t K, int64_t x_stride, const float *panels,
                  int64_t N, const float *bias, float *y, int64_t y_stride, int threads) {
    if (M <= 0 || N <= 0) return;
    const int64_t panel_total = (N + LANES - 1) / LANES;
    const int panels_per_tile = M <= 4 ? 4 : 2;
    const int64_t tiles = (panel_total + panels_per_tile - 1) / panels_per_tile;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t p = t * panels_per_tile;
        const int64_t left = panel_total - p;
        const int panel_count = (int)(left < panels_per_tile ? left : panels_per_tile);
        /* One pass over the rows at a time reads each weight once: no block needed. */
        const int64_t k_block = M <= 8 ? K : K_BLOCK;
        for (int64_t k0 = 0; k0 < K; k0 += k_block) {
            const int64_t k1 = K - k0 < k_block ? K : k0 + k_block;
            if (M <= 4) {
                const int64_t m0 = 0;
                switch (M) {
                case 1: TILE(1, 4); break;
                case 2: TILE(2, 4); break;
                case 3: TILE(3, 4); break;
                default: TILE(4, 4); break;
                }
                continue;
            }
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                switch (M - m0 < 8 ? M - m0 : 8) {
                case 1: TILE(1, 2); break;
                case 2: TILE(2, 2); break;
                case 3: TILE(3, 2); break;
                case 4: TILE(4, 2); break;
                case 5: TILE(5, 2); break;
                case 6: TILE(6, 2); break;
                case 7: TILE(7, 2); break;
                default: TILE(8, 2); break;
                }
            }
        }
    }
}
