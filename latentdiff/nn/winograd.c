/* Winograd F(4x4, 3x3): a 3x3 convolution (stride 1, padding 1) as 36 matrix products, a quarter of the
 * multiplications of the direct convolution (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks").
 *
 * latentdiff/nn/winograd.py compiles this file on first use and calls it through ctypes. This file holds the three
 * transforms; the 36 products between them are PyTorch's (a batched matrix product):
 *
 *   weights  w (K, C, 3, 3)           -> U (36, Kb, C)  U[p] = G g G^T, p = 6 i + j, outputs [k0, k1)
 *   input    x (N, C, H, W), a band   -> V (36, C, T)   V[p] = B^T d B of each 6x6 patch d (tiles 4 apart);
 *                                                        x in any strides (contiguous, channels-last)
 *   products                             M (36, Kb, T)  M[p] = U[p] V[p]              (torch.bmm)
 *   output   M + bias[k0:k1]          -> y (N, K, H, W) the 4x4 outputs A^T m A of each tile, channels [k0, k1);
 *                                                        y in any strides (the caller gives it x's memory format)
 *
 * Tiles are 4x4 output pixels; tile (ty, tx) of image n reads input rows 4 ty - 1 .. 4 ty + 4 and columns
 * 4 tx - 1 .. 4 tx + 4 (zero outside the image: padding 1). The tile rows of the batch are numbered g = n th + ty;
 * a band is the rows [g0, g1), possibly across images, so T = (g1 - g0) tw and tile t = (g - g0) tw + tx. The
 * caller bounds its buffers by taking the tiles in bands and the output channels in blocks [k0, k1), Kb = k1 - k0.
 *
 * Everything is float32. Threads: each transform splits its outer loop into nthreads contiguous ranges
 * (the caller's thread takes the first), so the result does not depend on the number of threads.
 */
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 256

/* ---- the 1-D transforms ---------------------------------------------------------------------------------------- */

/* B^T d: six inputs to six outputs. */
#define IN6(d0, d1, d2, d3, d4, d5, v0, v1, v2, v3, v4, v5) do { \
    float s13 = (d4) - 4.0f * (d2), s24 = (d3) - 4.0f * (d1), s35 = (d4) - (d2), s46 = 2.0f * ((d3) - (d1)); \
    v0 = 4.0f * (d0) - 5.0f * (d2) + (d4); \
    v1 = s13 + s24; \
    v2 = s13 - s24; \
    v3 = s35 + s46; \
    v4 = s35 - s46; \
    v5 = 4.0f * (d1) - 5.0f * (d3) + (d5); \
} while (0)

/* A^T m: six inputs to four outputs. */
#define OUT4(m0, m1, m2, m3, m4, m5, o0, o1, o2, o3) do { \
    float a12 = (m1) + (m2), s12 = (m1) - (m2), a34 = (m3) + (m4), s34 = (m3) - (m4); \
    o0 = (m0) + a12 + a34; \
    o1 = s12 + 2.0f * s34; \
    o2 = a12 + 4.0f * a34; \
    o3 = s12 + 8.0f * s34 + (m5); \
} while (0)

/* G g: three inputs to six outputs. */
#define WT6(g0, g1, g2, r0, r1, r2, r3, r4, r5) do { \
    float e = (g0) + (g2); \
    r0 = 0.25f * (g0); \
    r1 = -(e + (g1)) * (1.0f / 6.0f); \
    r2 = -(e - (g1)) * (1.0f / 6.0f); \
    r3 = (g0) * (1.0f / 24.0f) + (g1) * (1.0f / 12.0f) + (g2) * (1.0f / 6.0f); \
    r4 = (g0) * (1.0f / 24.0f) - (g1) * (1.0f / 12.0f) + (g2) * (1.0f / 6.0f); \
    r5 = (g2); \
} while (0)

/* ---- threads --------------------------------------------------------------------------------------------------- */

typedef struct job job;
struct job {
    int (*run)(const job *, int64_t, int64_t); /* items [begin, end); 0, or 2 where memory ran out */
    int64_t items;
    const void *in;
    void *out;
    const void *bias;
    int N, C, K, H, W, th, tw, g0, g1, k0, k1;
    int64_t sn, sc, sh, sw; /* the input's (or the output's) strides, in elements */
};

typedef struct { const job *j; int64_t begin, end; int status; } slice;

static void *run_slice(void *arg) {
    slice *s = (slice *)arg;
    s->status = s->j->run(s->j, s->begin, s->end);
    return NULL;
}

/* Split [0, items) into nthreads contiguous slices; if a thread cannot be started, its slice runs here. Returns 0,
 * or 2 where a slice could not allocate its buffers. */
static int run_parallel(const job *j, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > j->items) nthreads = (int)(j->items > 0 ? j->items : 1);
    slice s[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int i = 0; i < nthreads; i++) {
        s[i].j = j;
        s[i].begin = j->items * i / nthreads;
        s[i].end = j->items * (i + 1) / nthreads;
    }
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&ids[i], NULL, run_slice, &s[i]) == 0;
    run_slice(&s[0]);
    for (int i = 1; i < nthreads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        else run_slice(&s[i]);
    }
    int status = 0;
    for (int i = 0; i < nthreads; i++) status |= s[i].status;
    return status;
}

/* ---- weights: U[p][k][c] = (G g G^T)[p] of g = w[k][c] ---------------------------------------------------------- */

#define CB 16 /* input channels per step of the weight transform (vectorised across them) */

/* Items: output channels. */
static int weight_rows(const job *j, int64_t begin, int64_t end) {
    const int64_t KC = (int64_t)(j->k1 - j->k0) * j->C;
    float *U = (float *)j->out;
    for (int64_t k = j->k0 + begin; k < j->k0 + end; k++) {
        for (int c0 = 0; c0 < j->C; c0 += CB) {
            const int nc = j->C - c0 < CB ? j->C - c0 : CB;
            float g[9][CB], t[6][3][CB], u[36][CB];
            const int64_t at = (k * j->C + c0) * 9;
            for (int c = 0; c < nc; c++)
                for (int i = 0; i < 9; i++) g[i][c] = ((const float *)j->in)[at + 9 * c + i];
            for (int c = nc; c < CB; c++)
                for (int i = 0; i < 9; i++) g[i][c] = 0.0f;
            for (int col = 0; col < 3; col++)
                for (int c = 0; c < CB; c++)
                    WT6(g[col][c], g[3 + col][c], g[6 + col][c], t[0][col][c], t[1][col][c], t[2][col][c],
                        t[3][col][c], t[4][col][c], t[5][col][c]);
            for (int r = 0; r < 6; r++)
                for (int c = 0; c < CB; c++)
                    WT6(t[r][0][c], t[r][1][c], t[r][2][c], u[6 * r][c], u[6 * r + 1][c], u[6 * r + 2][c],
                        u[6 * r + 3][c], u[6 * r + 4][c], u[6 * r + 5][c]);
            float *dst = U + (k - j->k0) * j->C + c0;
            for (int p = 0; p < 36; p++) memcpy(dst + p * KC, u[p], sizeof(float) * (size_t)nc);
        }
    }
    return 0;
}

int latentdiff_winograd_weight(const float *w, int K, int C, int k0, int k1, float *U, int nthreads) {
    if (K < 1 || C < 1 || k0 < 0 || k1 > K || k0 >= k1) return 1;
    job j = {weight_rows, k1 - k0, w, U, NULL, 0, C, K, 0, 0, 0, 0, 0, 0, k0, k1, 0, 0, 0, 0};
    return run_parallel(&j, nthreads);
}

/* ---- input: V[p][c][t] = (B^T d B)[p] of tile t's 6x6 patch of channel c ---------------------------------------- */

#define RB 16 /* channels whose input rows are read together (a channels-last pixel's 16 neighbours in memory) */

/* Items: (tile row, block of RB channels) pairs of the band. The six input rows of the block's channels are read
 * first, pixel by pixel across the channels where the input is not contiguous along rows (channels-last: one cache
 * line per pixel); then, channel by channel, the column transform along whole rows and the row transform on the
 * columns of each tile gathered into six arrays (col[k][tx] = column 4 tx + k), both across the tiles. */
static int input_rows(const job *j, int64_t begin, int64_t end) {
    const int rows = j->g1 - j->g0, tw = j->tw, wp = 4 * tw + 2, blocks = (j->C + RB - 1) / RB;
    const int64_t T = (int64_t)rows * tw, CT = (int64_t)j->C * T;
    float *mem = malloc(sizeof(float) * (size_t)((6 * RB + 6) * wp + 6 * tw));
    if (!mem) return 2;
    float *t[6], *col[6];
    for (int r = 0; r < 6; r++) {
        t[r] = mem + (6 * RB + r) * wp;
        col[r] = mem + (6 * RB + 6) * wp + r * tw;
    }
    for (int64_t item = begin; item < end; item++) {
        const int g = j->g0 + (int)(item / blocks), c0 = (int)(item % blocks) * RB, n = g / j->th, ty = g % j->th;
        const int nc = j->C - c0 < RB ? j->C - c0 : RB;
        for (int r = 0; r < 6; r++) { /* buf(cc, r)[1 + x] = x[n][c0 + cc][4 ty - 1 + r][x], zero-padded */
            const int y = 4 * ty - 1 + r;
            for (int cc = 0; cc < nc; cc++) memset(mem + (cc * 6 + r) * wp, 0, sizeof(float) * (size_t)wp);
            if (y < 0 || y >= j->H) continue;
            const float *src = (const float *)j->in + n * j->sn + c0 * j->sc + y * j->sh;
            if (j->sw == 1) {
                for (int cc = 0; cc < nc; cc++)
                    memcpy(mem + (cc * 6 + r) * wp + 1, src + cc * j->sc, sizeof(float) * (size_t)j->W);
            } else {
                for (int x = 0; x < j->W; x++)
                    for (int cc = 0; cc < nc; cc++) mem[(cc * 6 + r) * wp + 1 + x] = src[x * j->sw + cc * j->sc];
            }
        }
        for (int cc = 0; cc < nc; cc++) {
            const float *b0 = mem + cc * 6 * wp, *b1 = b0 + wp, *b2 = b1 + wp, *b3 = b2 + wp, *b4 = b3 + wp,
                        *b5 = b4 + wp;
            for (int x = 0; x < wp; x++)
                IN6(b0[x], b1[x], b2[x], b3[x], b4[x], b5[x], t[0][x], t[1][x], t[2][x], t[3][x], t[4][x], t[5][x]);
            float *dst = (float *)j->out + (int64_t)(c0 + cc) * T + (int64_t)(g - j->g0) * tw;
            for (int i = 0; i < 6; i++) {
                for (int k = 0; k < 6; k++)
                    for (int tx = 0; tx < tw; tx++) col[k][tx] = t[i][4 * tx + k];
                float *d0 = dst + (int64_t)(6 * i) * CT, *d1 = d0 + CT, *d2 = d1 + CT, *d3 = d2 + CT, *d4 = d3 + CT,
                      *d5 = d4 + CT;
                for (int tx = 0; tx < tw; tx++)
                    IN6(col[0][tx], col[1][tx], col[2][tx], col[3][tx], col[4][tx], col[5][tx], d0[tx], d1[tx],
                        d2[tx], d3[tx], d4[tx], d5[tx]);
            }
        }
    }
    free(mem);
    return 0;
}

int latentdiff_winograd_input(const float *x, const int64_t *strides, int N, int C, int H, int W, int g0, int g1,
                              float *V, int nthreads) {
    const int th = (H + 3) / 4, tw = (W + 3) / 4;
    if (N < 1 || C < 1 || H < 1 || W < 1 || g0 < 0 || g1 > N * th || g0 >= g1) return 1;
    job j = {input_rows, (int64_t)((C + RB - 1) / RB) * (g1 - g0), x, V, NULL, N, C, 0, H, W, th, tw, g0, g1, 0, 0,
             strides[0], strides[1], strides[2], strides[3]};
    return run_parallel(&j, nthreads);
}

/* ---- output: y[n][k] of tile t = A^T m A + bias[k], m the 36 values M[p][k][t] ---------------------------------- */

/* Items: (tile row, block of RB output channels) pairs of the band; per channel the same two passes as the input's,
 * across the tiles, into four output rows per channel; then the rows are written, pixel by pixel across the
 * channels where the output is not contiguous along rows (channels-last: one cache line per pixel). */
static int output_rows(const job *j, int64_t begin, int64_t end) {
    const int rows = j->g1 - j->g0, tw = j->tw, blocks = (j->k1 - j->k0 + RB - 1) / RB;
    const int64_t T = (int64_t)rows * tw, KT = (int64_t)(j->k1 - j->k0) * T;
    float *mem = malloc(sizeof(float) * (size_t)(28 * tw + RB * 16 * tw));
    if (!mem) return 2;
    float *t[4][6], *o[4], *out = mem + 28 * tw; /* out[(kk * 4 + r) * 4 tw + x] */
    for (int r = 0; r < 4; r++) {
        for (int q = 0; q < 6; q++) t[r][q] = mem + (6 * r + q) * tw;
        o[r] = mem + (24 + r) * tw;
    }
    for (int64_t item = begin; item < end; item++) {
        const int g = j->g0 + (int)(item / blocks), kb = j->k0 + (int)(item % blocks) * RB, n = g / j->th,
                  ty = g % j->th;
        const int nk = j->k1 - kb < RB ? j->k1 - kb : RB, ny = j->H - 4 * ty < 4 ? j->H - 4 * ty : 4;
        for (int kk = 0; kk < nk; kk++) {
            const int k = kb + kk;
            const float *src = (const float *)j->in + (int64_t)(k - j->k0) * T + (int64_t)(g - j->g0) * tw;
            const float b = j->bias ? ((const float *)j->bias)[k] : 0.0f;
            for (int col = 0; col < 6; col++) {
                const float *m0 = src + (int64_t)col * KT, *m1 = m0 + 6 * KT, *m2 = m1 + 6 * KT, *m3 = m2 + 6 * KT,
                            *m4 = m3 + 6 * KT, *m5 = m4 + 6 * KT;
                for (int tx = 0; tx < tw; tx++)
                    OUT4(m0[tx], m1[tx], m2[tx], m3[tx], m4[tx], m5[tx], t[0][col][tx], t[1][col][tx],
                         t[2][col][tx], t[3][col][tx]);
            }
            for (int r = 0; r < ny; r++) {
                float *row = out + (int64_t)(kk * 4 + r) * 4 * tw;
                for (int tx = 0; tx < tw; tx++)
                    OUT4(t[r][0][tx], t[r][1][tx], t[r][2][tx], t[r][3][tx], t[r][4][tx], t[r][5][tx], o[0][tx],
                         o[1][tx], o[2][tx], o[3][tx]);
                for (int tx = 0; tx < tw; tx++)
                    for (int q = 0; q < 4; q++) row[4 * tx + q] = o[q][tx] + b;
            }
        }
        for (int r = 0; r < ny; r++) {
            float *dst = (float *)j->out + n * j->sn + kb * j->sc + (int64_t)(4 * ty + r) * j->sh;
            if (j->sw == 1) {
                for (int kk = 0; kk < nk; kk++)
                    memcpy(dst + kk * j->sc, out + (int64_t)(kk * 4 + r) * 4 * tw, sizeof(float) * (size_t)j->W);
            } else {
                const float *from = out + (int64_t)r * 4 * tw;
                for (int x = 0; x < j->W; x++)
                    for (int kk = 0; kk < nk; kk++) dst[x * j->sw + kk * j->sc] = from[(int64_t)kk * 16 * tw + x];
            }
        }
    }
    free(mem);
    return 0;
}

int latentdiff_winograd_output(const float *M, const float *bias, int N, int K, int H, int W, int k0, int k1, int g0,
                               int g1, float *y, const int64_t *strides, int nthreads) {
    const int th = (H + 3) / 4, tw = (W + 3) / 4;
    if (N < 1 || K < 1 || H < 1 || W < 1 || k0 < 0 || k1 > K || k0 >= k1 || g0 < 0 || g1 > N * th || g0 >= g1)
        return 1;
    job j = {output_rows, (int64_t)((k1 - k0 + RB - 1) / RB) * (g1 - g0), M, y, bias, N, 0, K, H, W, th, tw, g0, g1,
             k0, k1, strides[0], strides[1], strides[2], strides[3]};
    return run_parallel(&j, nthreads);
}
