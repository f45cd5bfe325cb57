/* RMSNorm over float32 rows: y = x / sqrt(mean(x^2) + eps) * (weight + offset).
 *
 * offset is 0 for Llama's form and 1 for Gemma's (weights stored as a difference from one). A
 * row's mean is summed in 16 interleaved partial sums (vectorised by the compiler without
 * reassociating anything, so without -ffast-math), then the 16 added in order: each row's result
 * depends only on that row, never on which rows share the call. Rows are split over torch's
 * OpenMP threads only from PARALLEL_ROWS up: a decode step's few rows take less than waking a
 * second thread costs.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define PARALLEL_ROWS 64

static void normalise_row(const float *restrict x, int64_t dim, const float *restrict weight, float offset,
                          float eps, float *restrict y) {
    float partial[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= dim; i += LANES)
        for (int lane = 0; lane < LANES; lane++) partial[lane] += x[i + lane] * x[i + lane];
    for (int lane = 0; i + lane < dim; lane++) partial[lane] += x[i + lane] * x[i + lane];
    float sum = 0.0f;
    for (int lane = 0; lane < LANES; lane++) sum += partial[lane];
    const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
    for (i = 0; i < dim; i++) y[i] = (weight[i] + offset) * (x[i] * scale);
}

void rms_norm(const float *x, int64_t rows, int64_t dim, int64_t x_stride, const float *weight, float offset,
              float eps, float *y, int64_t y_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t row = 0; row < rows; row++)
        normalise_row(x + row * x_stride, dim, weight, offset, eps, y + row * y_stride);
}
