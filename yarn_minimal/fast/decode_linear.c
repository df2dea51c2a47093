/* y = W x for one token: a linear layer (nn.Linear, no bias) at a decoding step on the CPU.
 *
 * A decoding step multiplies one vector by every weight matrix of the model, so its time is the
 * time to read the weights: each is read once and used for one multiply-add per element. Here
 * the rows of W are split evenly over the threads, so that every core streams its share of the
 * matrix, and each row is one vectorised dot product with x. The PyTorch code it stands in for,
 * and must equal within float32 rounding, is torch.nn.functional.linear(x, W);
 * fast/decode_kernel.py builds and calls this file.
 *
 * float32, row-major: W (rows, cols) as nn.Linear keeps it, (out_features, in_features);
 * x (cols,); y (rows,).
 */
#include <stdint.h>

void decode_linear(const float *restrict W, const float *restrict x, float *restrict y, int64_t rows,
                   int64_t cols, int64_t n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const float *w = W + r * cols;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < cols; i++) dot += w[i] * x[i];
    y[r] = dot;
  }
}
