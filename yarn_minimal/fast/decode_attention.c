/* One decoding step of attention (Eq. 2) over a KV cache on the CPU, reading each key once.
 *
 * With a static method the cache holds keys already rotated, and this is plain attention for
 * one query. Under Dynamic Scaling (Sec. 3.3) s changes at every step, so the cache keeps keys
 * before RoPE and every step must rotate all of them at the new s (Eq. 5) before attention reads
 * them. Written in PyTorch that is a rotation that reads the keys and writes rotated ones, then
 * attention that reads those back: three passes over the keys where a static cache makes one.
 * Here each key is rotated in registers as attention reads it, so the keys are read once, as a
 * static cache's are. The PyTorch code it stands in for, and must equal, is model.CachedKeys +
 * attention.attention; fast/decode_kernel.py builds and calls this file.
 *
 * float32, row-major:
 *   q       (B, H, D)          the new token's queries, already rotated
 *   k, v    (B, T, Hkv, D)     keys (before RoPE when `table` is given, else rotated), values;
 *                              batch rows `batch_stride` floats apart (the first T positions of
 *                              a preallocated cache)
 *   table   (T, D/2, 2)        cos and sin of m theta_d at this step's s, times sqrt(1/t) (Eq. 22);
 *                              NULL: the keys are rotated already (a static method)
 *   out     (B, H, D)
 *   scores  (H, T)             work space, one batch row at a time
 *   partial (n_chunks, H, D+2) work space: per chunk of positions and head, the largest score,
 *                              the sum of exp(score - largest) and the output weighted by them
 * The T positions are split into n_chunks chunks, one per thread, which are merged at the end
 * through their largest scores (flash-decoding's split over keys). Query head h reads kv head
 * h / (H / Hkv) (grouped-query attention).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GLIBC__) /* glibc's libmvec has it: exp of 16 floats at once */
#pragma omp declare simd notinbranch
float expf(float);
#endif

#define BLOCK 256 /* positions whose weighted values are summed apart before joining the chunk's sum */

#define INLINE static inline __attribute__((always_inline))

/* Eq. 2 over positions t0..t1-1, unnormalised: fills `partial` for this chunk */
INLINE void attend_chunk(const float *q, const float *k, const float *v, const float *table, int64_t t0,
                         int64_t t1, int64_t T, int64_t H, int64_t Hkv, int64_t D, float *scores,
                         float *partial) {
  const int64_t group = H / Hkv, row = Hkv * D;
  const float scale = 1.0f / sqrtf((float)D);
  float rotated[D];
  /* scores q . R_t k_t / sqrt(D), position by position, so that the keys are read in memory order */
  for (int64_t t = t0; t < t1; t++) {
    for (int64_t g = 0; g < Hkv; g++) {
      const float *key = k + t * row + g * D;
      if (table != NULL) {
        const float *turn = table + t * D;
        for (int64_t i = 0; i < D; i += 2) { /* Eq. 5: (k_2d + i k_2d+1) (cos + i sin) */
          rotated[i] = key[i] * turn[i] - key[i + 1] * turn[i + 1];
          rotated[i + 1] = key[i] * turn[i + 1] + key[i + 1] * turn[i];
        }
        key = rotated;
      }
      for (int64_t h = g * group; h < (g + 1) * group; h++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += q[h * D + d] * key[d];
        scores[h * T + t] = dot * scale;
      }
    }
  }
  for (int64_t h = 0; h < H; h++) { /* exp(score - largest): the softmax's numerators */
    float *s = scores + h * T, largest = -INFINITY;
    double total = 0.0; /* a sum of up to T terms: float32 would lose digits at 128k */
#pragma omp simd reduction(max : largest)
    for (int64_t t = t0; t < t1; t++) largest = s[t] > largest ? s[t] : largest;
#pragma omp simd reduction(+ : total)
    for (int64_t t = t0; t < t1; t++) {
      s[t] = expf(s[t] - largest);
      total += s[t];
    }
    float *part = partial + h * (D + 2);
    part[0] = largest;
    part[1] = (float)total;
    for (int64_t d = 0; d < D; d++) part[2 + d] = 0.0f;
  }
  float block_sum[H * D]; /* times the values, position by position, summed per BLOCK positions */
  for (int64_t a = t0; a < t1; a += BLOCK) {
    for (int64_t i = 0; i < H * D; i++) block_sum[i] = 0.0f;
    for (int64_t t = a; t < (a + BLOCK < t1 ? a + BLOCK : t1); t++)
      for (int64_t h = 0; h < H; h++) {
        const float p = scores[h * T + t], *value = v + t * row + (h / group) * D;
        for (int64_t d = 0; d < D; d++) block_sum[h * D + d] += p * value[d];
      }
    for (int64_t h = 0; h < H; h++)
      for (int64_t d = 0; d < D; d++) partial[h * (D + 2) + 2 + d] += block_sum[h * D + d];
  }
}

/* attend_chunk with the head size a constant where it is a common one, so that the compiler
 * unrolls the loops over it */
static void attend_chunk_of(const float *q, const float *k, const float *v, const float *table, int64_t t0,
                            int64_t t1, int64_t T, int64_t H, int64_t Hkv, int64_t D, float *scores,
                            float *partial) {
  switch (D) {
    case 32: attend_chunk(q, k, v, table, t0, t1, T, H, Hkv, 32, scores, partial); break;
    case 64: attend_chunk(q, k, v, table, t0, t1, T, H, Hkv, 64, scores, partial); break;
    case 128: attend_chunk(q, k, v, table, t0, t1, T, H, Hkv, 128, scores, partial); break;
    default: attend_chunk(q, k, v, table, t0, t1, T, H, Hkv, D, scores, partial);
  }
}

void decode_attention(const float *q, const float *k, const float *v, const float *table, float *out,
                      int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t batch_stride,
                      float *scores, float *partial, int64_t n_chunks) {
  for (int64_t b = 0; b < B; b++) {
    const float *qb = q + b * H * D, *kb = k + b * batch_stride, *vb = v + b * batch_stride;
#pragma omp parallel for num_threads(n_chunks)
    for (int64_t c = 0; c < n_chunks; c++)
      attend_chunk_of(qb, kb, vb, table, T * c / n_chunks, T * (c + 1) / n_chunks, T, H, Hkv, D, scores,
                      partial + c * H * (D + 2));
    /* merge the chunks: softmax over all positions = each chunk's terms times
     * exp(its largest score - the overall largest) */
    for (int64_t h = 0; h < H; h++) {
      float largest = -INFINITY, total = 0.0f, *o = out + (b * H + h) * D;
      for (int64_t c = 0; c < n_chunks; c++) {
        const float *part = partial + (c * H + h) * (D + 2);
        largest = part[0] > largest ? part[0] : largest;
      }
      for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
      for (int64_t c = 0; c < n_chunks; c++) {
        const float *part = partial + (c * H + h) * (D + 2);
        const float weight = expf(part[0] - largest);
        total += weight * part[1];
        for (int64_t d = 0; d < D; d++) o[d] += weight * part[2 + d];
      }
      for (int64_t d = 0; d < D; d++) o[d] /= total;
    }
  }
}
