#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CHUNK 16384

typedef struct {
    int32_t t;   /* tensor */
    int64_t s;   /* first element */
    int64_t len; /* at most CHUNK */
} chunk_t;

static int64_t count_chunks(int lo, int hi, const int64_t *numel) {
    int64_t c = 0;
    for (int t = lo; t < hi; t++) c += (numel[t] + CHUNK - 1) / CHUNK;
    return c;
}

/* The chunks of tensors lo..hi-1 (only those with keep[t] when keep is given). */
static int64_t make_chunks(int lo, int hi, const int64_t *numel, const uint8_t *keep,
                           chunk_t *out) {
    int64_t c = 0;
    for (int t = lo; t < hi; t++) {
        if (keep && !keep[t]) continue;
        for (int64_t s = 0; s < numel[t]; s += CHUNK, c++) {
            out[c].t = t;
            out[c].s = s;
            out[c].len = numel[t] - s < CHUNK ? numel[t] - s : CHUNK;
        }
    }
    return c;
}

/* out[0] = 1 if any entry of any g[t] is NaN or infinite, else 0. Returns -1 when out
   of memory, else 0. */
int molf_nonfinite(int n, float **g, const int64_t *numel, float *out, int nthreads) {
    chunk_t *ch = (chunk_t *)malloc(sizeof(chunk_t) * (count_chunks(0, n, numel) + 1));
    if (!ch) return -1;
    const int64_t nc = make_chunks(0, n, numel, NULL, ch);
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nc > 2) reduction(| : bad)
    for (int64_t c = 0; c < nc; c++) {
        const uint32_t *x = (const uint32_t *)(g[ch[c].t] + ch[c].s);
        const int64_t len = ch[c].len;
        uint32_t acc = 0; /* all exponent bits set: NaN or infinity */
#pragma omp simd reduction(| : acc)
        for (int64_t j = 0; j < len; j++) acc |= (x[j] & 0x7f800000u) == 0x7f800000u;
        bad |= acc != 0;
    }
    out[0] = bad ? 1.0f : 0.0f;
    free(ch);
    return 0;
}

/* The MoLF step of the routed tensors, one module at a time: tensors
   mod_start[i] .. mod_start[i+1]-1 belong to module i, and tensor t to the cell
   cell[t] = i * E + e of its expert e. For each module:
   1. Adam moments and step count of each tensor (left alone when *found_inf), and its
      score partial sum over the new moments (summed per chunk in double, in order);
   2. the scores of its experts (float32, as the foreach path computes them) and
      Top-K: rank_e = #{j: s_j > s_e} + #{j < e: s_j == s_e}, non-participating
      experts and those with a NaN or infinite score scoring -inf and never selected,
      nothing selected on a skipped step;
   3. the AdamW update of the selected experts' tensors, while their moments are still
      in the cache: p = p * decay - size * m / (sqrt(v) * rbc2 + eps) with the
      coefficients of molf.optim.functional.adamw_coefficients (computed here, from the
      step counts this loop has just moved, so the host never reads them). The others'
      weights are not read.
   Returns -1 when out of memory (before touching any tensor), else 0. */
int molf_step(int n_mod, const int64_t *mod_start, int E, int k, float **p, float **g,
               float **m, float **v, float **step, const int64_t *numel, const int64_t *cell,
               const double *lr, const double *wd, const float *cell_size,
               const uint8_t *participating, const float *found_inf, double beta1,
               double beta2, double eps, int pfn, float *scores, uint8_t *selected,
               int nthreads) {
    const int n = (int)mod_start[n_mod];
    const int skip = found_inf[0] != 0.0f;
    const float b1 = (float)beta1, c1 = (float)(1.0 - beta1);
    const float b2 = (float)beta2, c2 = (float)(1.0 - beta2), e = (float)eps;
    int64_t most = 1;
    for (int i = 0; i < n_mod; i++) {
        const int64_t c = count_chunks((int)mod_start[i], (int)mod_start[i + 1], numel);
        most = c > most ? c : most;
    }
    chunk_t *ch = (chunk_t *)malloc(sizeof(chunk_t) * most);
    double *part = (double *)malloc(sizeof(double) * most);
    double *tsum = (double *)malloc(sizeof(double) * (n + 1));
    uint8_t *win = (uint8_t *)malloc(n + 1);
    float *coef = (float *)malloc(sizeof(float) * 3 * (n + 1));
    float *sums = (float *)malloc(sizeof(float) * (E + 1));
    uint8_t *elig = (uint8_t *)malloc(E + 1);
    if (!ch || !part || !tsum || !win || !coef || !sums || !elig) {
        free(ch);
        free(part);
        free(tsum);
        free(win);
        free(coef);
        free(sums);
        free(elig);
        return -1;
    }
    for (int i = 0; i < n_mod; i++) {
        const int lo = (int)mod_start[i], hi = (int)mod_start[i + 1];
        int64_t nc = make_chunks(lo, hi, numel, NULL, ch);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nc > 2)
        for (int64_t c = 0; c < nc; c++) {
            const int t = ch[c].t;
            const int64_t len = ch[c].len;
            const float *gt = g[t] + ch[c].s;
            float *mt = m[t] + ch[c].s, *vt = v[t] + ch[c].s;
            double acc = 0.0;
            if (skip) {
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < len; j++) {
                    const float r = mt[j] / (sqrtf(vt[j]) + e);
                    acc += pfn ? r * r : mt[j] * r;
                }
            } else if (pfn) {
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < len; j++) {
                    const float gj = gt[j];
                    const float mj = b1 * mt[j] + c1 * gj, vj = b2 * vt[j] + c2 * (gj * gj);
                    mt[j] = mj;
                    vt[j] = vj;
                    const float r = mj / (sqrtf(vj) + e);
                    acc += r * r;
                }
            } else {
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < len; j++) {
                    const float gj = gt[j];
                    const float mj = b1 * mt[j] + c1 * gj, vj = b2 * vt[j] + c2 * (gj * gj);
                    mt[j] = mj;
                    vt[j] = vj;
                    acc += mj * (mj / (sqrtf(vj) + e));
                }
            }
            part[c] = acc;
        }
        for (int t = lo; t < hi; t++) tsum[t] = 0.0;
        for (int64_t c = 0; c < nc; c++) tsum[ch[c].t] += part[c];
        for (int x = 0; x < E; x++) sums[x] = 0.0f;
        for (int t = lo; t < hi; t++)
            sums[cell[t] - (int64_t)i * E] += (float)(pfn ? tsum[t] : tsum[t] * lr[t]);
        float *s = scores + (int64_t)i * E;
        const uint8_t *part_i = participating + (int64_t)i * E;
        uint8_t *sel = selected + (int64_t)i * E;
        for (int x = 0; x < E; x++) {
            s[x] = sums[x] / cell_size[(int64_t)i * E + x];
            if (pfn) s[x] = sqrtf(s[x]);
        }
        for (int x = 0; x < E; x++) elig[x] = part_i[x] && isfinite(s[x]);
        for (int x = 0; x < E; x++) {
            const float sx = elig[x] ? s[x] : -INFINITY;
            int rank = 0;
            for (int y = 0; y < E; y++) {
                const float sy = elig[y] ? s[y] : -INFINITY;
                rank += (sy > sx) + (y < x && sy == sx);
            }
            sel[x] = !skip && elig[x] && rank < k;
        }
        if (skip) continue;
        for (int t = lo; t < hi; t++) {
            step[t][0] += 1.0f;
            win[t] = sel[cell[t] - (int64_t)i * E];
            const double tt = (double)step[t][0];
            coef[3 * t] = (float)(1.0 - lr[t] * wd[t]);                  /* decay */
            coef[3 * t + 1] = (float)(lr[t] / (1.0 - pow(beta1, tt)));  /* step size */
            coef[3 * t + 2] = (float)(1.0 / sqrt(1.0 - pow(beta2, tt))); /* 1/sqrt(bc2) */
        }
        nc = make_chunks(lo, hi, numel, win, ch);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nc > 2)
        for (int64_t c = 0; c < nc; c++) {
            const int t = ch[c].t;
            const int64_t len = ch[c].len;
            float *pt = p[t] + ch[c].s;
            const float *mt = m[t] + ch[c].s, *vt = v[t] + ch[c].s;
            const float decay = coef[3 * t], size = coef[3 * t + 1], rbc2 = coef[3 * t + 2];
#pragma omp simd
            for (int64_t j = 0; j < len; j++)
                pt[j] = pt[j] * decay - size * (mt[j] / (sqrtf(vt[j]) * rbc2 + e));
        }
    }
    free(ch);
    free(part);
    free(tsum);
    free(win);
    free(coef);
    free(sums);
    free(elig);
    return 0;
}
