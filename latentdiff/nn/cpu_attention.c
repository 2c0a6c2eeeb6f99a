/* Multi-head attention for x86-64 CPUs with AVX-512: one pass over the keys per block of queries, with the softmax
 * taken online (a running maximum and sum per query), so the (queries x keys) score matrix is never written out;
 * a block of scores stays in the first-level cache.
 *
 * latentdiff/nn/cpu_attention.py compiles this file on first use (gcc or clang, -O3, AVX-512 F/BW/VL/BF16) and calls
 * it through ctypes; it runs where PyTorch's scaled_dot_product_attention would, for inference without a mask.
 *
 * Layout: q (B, Lq, H*D), k and v (B, Lk, H*D), out (B, Lq, H*D), each with its own batch and row stride (in
 * elements); head h of row i is the D elements from h*D. D is even and at most MAX_D.
 *
 * bfloat16: scores are products of bf16 pairs summed in fp32 (vdpbf16ps), the softmax is fp32, the probabilities are
 * rounded to bf16 for the product with V (as PyTorch's flash kernel does), which is summed in fp32; the output is
 * rounded to bf16 once, at the end.
 * float32: every step in fp32 (fused multiply-adds); the result differs from PyTorch's by float rounding.
 *
 * Threads: the (batch, head, block of queries) tasks are shared out through an atomic counter among nthreads
 * threads, the caller's included.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BR 48     /* queries per task (a multiple of QR and of the value tiles' 8, 6 and 4 rows) */
#define QR 6      /* queries per tile of scores */
#define BC 128    /* keys per block (a multiple of 64) */
#define MAX_D 256 /* the largest head dimension (cpu_attention.py's MAX_WIDTH) */
#define MAX_THREADS 256

typedef uint16_t bf16;

/* ---- vector exp ----------------------------------------------------------------------------------------------- */

/* 2^x for x <= 0 (the softmax's shifted scores, in base 2): x = n + f with n an integer and |f| <= 1/2, and
 * 2^f = e^(f ln 2) by its Taylor polynomial, scaled by 2^n (scalef: 0 for very negative n). Degree 6 for fp32
 * (relative error below 1.2e-7 on |f| <= 1/2), degree 4 where the result is rounded to bf16 (below 4.2e-5, a
 * hundredth of bf16's rounding). -inf gives NaN: only lanes that are masked out afterwards may hold it. */
#define LN2 0.693147180559945309f
static inline __m512 exp2_ps(__m512 x, int degree6) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n), p;
    if (degree6) {
        p = _mm512_set1_ps(LN2 * LN2 * LN2 * LN2 * LN2 * LN2 / 720);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(LN2 * LN2 * LN2 * LN2 * LN2 / 120));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(LN2 * LN2 * LN2 * LN2 / 24));
    } else {
        p = _mm512_set1_ps(LN2 * LN2 * LN2 * LN2 / 24);
    }
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(LN2 * LN2 * LN2 / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(LN2 * LN2 / 2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(LN2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* ---- the problem and its scratch ------------------------------------------------------------------------------ */

typedef struct {
    const void *q, *k, *v;
    void *out;
    int64_t qb, qr, kb, kr, vb, vr, ob, or_;  /* batch and row strides, elements */
    int B, Lq, Lk, H, D;
    float scale;
    int bf;         /* 1: bfloat16, 0: float32 */
    int nkv;        /* key vectors of 16 per head (Lk rounded up to 16, / 16) */
    int dv;         /* D rounded up to 16 */
    void *kp, *vp;  /* packed keys and values, per (batch, head) */
    int64_t kp_head, vp_head;  /* their elements per head */
    int nqb;        /* blocks of BR queries per head */
    atomic_int next;
} problem_t;

typedef struct {
    float s[BR * BC];        /* scores, then fp32 probabilities */
    bf16 p[BR * BC];         /* bf16 probabilities */
    float o[BR * MAX_D];     /* output accumulators (rows of dv) */
    float m[BR], l[BR];      /* running maximum and sum per query */
    union { bf16 h[BR * MAX_D]; float f[BR * MAX_D]; } qt;  /* the block's queries, zero-padded rows */
} scratch_t;

/* ---- packing: keys as 16-key vectors, values as vectors over the head dimension -------------------------------- */

/* bf16 keys: for each vector of 16 keys and each pair of dimensions (2c, 2c+1), the 16 keys' pairs side by side:
 * one vdpbf16ps with a broadcast pair of a query gives 16 partial scores. fp32 keys: per vector of 16 keys and
 * dimension c, the 16 keys' values. Keys past Lk are zero. */
static void pack_head(problem_t *pb, int bh) {
    int b = bh / pb->H, h = bh % pb->H, D = pb->D, Lk = pb->Lk, dv = pb->dv, keys = pb->nkv * 16;
    if (pb->bf) {
        const bf16 *k = (const bf16 *)pb->k + b * pb->kb + (int64_t)h * D;
        const bf16 *v = (const bf16 *)pb->v + b * pb->vb + (int64_t)h * D;
        int32_t *kp = (int32_t *)((bf16 *)pb->kp + bh * pb->kp_head);  /* one pair of dimensions per int32 */
        bf16 *vp = (bf16 *)pb->vp + bh * pb->vp_head;
        memset(kp, 0, (size_t)keys * D * 2);
        memset(vp, 0, (size_t)keys * dv * 2);
        for (int j = 0; j < Lk; j++) {
            int32_t *dst = kp + (int64_t)(j / 16) * (D / 2) * 16 + j % 16;
            const bf16 *src = k + j * pb->kr;
            for (int c2 = 0; c2 < D / 2; c2++) memcpy(dst + c2 * 16, src + 2 * c2, 4);
        }
        /* values: per pair of keys (2j, 2j+1) and dimension c, the pair side by side */
        for (int j = 0; j < Lk; j++) {
            bf16 *dst = vp + (int64_t)(j / 2) * dv * 2 + j % 2;
            const bf16 *src = v + j * pb->vr;
            for (int c = 0; c < D; c++) dst[2 * c] = src[c];
        }
    } else {
        const float *k = (const float *)pb->k + b * pb->kb + (int64_t)h * D;
        const float *v = (const float *)pb->v + b * pb->vb + (int64_t)h * D;
        float *kp = (float *)pb->kp + bh * pb->kp_head, *vp = (float *)pb->vp + bh * pb->vp_head;
        memset(kp, 0, (size_t)keys * D * 4);
        memset(vp, 0, (size_t)keys * dv * 4);
        for (int j = 0; j < Lk; j++) {
            float *dst = kp + (int64_t)(j / 16) * D * 16 + j % 16;
            const float *src = k + j * pb->kr;
            for (int c = 0; c < D; c++) dst[c * 16] = src[c];
        }
        for (int j = 0; j < Lk; j++) memcpy(vp + (int64_t)j * dv, v + j * pb->vr, (size_t)D * 4);
    }
}

/* ---- scores: QR queries x NV vectors of 16 keys ------------------------------------------------------------------ */

#define QK_BF16(NV)                                                                                              \
    static inline __attribute__((always_inline)) void qk_bf16_##NV(const bf16 *q, int D, const bf16 *kp, float *s) { \
        __m512 acc[QR][NV];                                                                                          \
        for (int r = 0; r < QR; r++)                                                                                 \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();                                           \
        for (int c2 = 0; c2 < D / 2; c2++) {                                                                        \
            __m512i kv[NV];                                                                                         \
            for (int v = 0; v < NV; v++) kv[v] = _mm512_loadu_si512(kp + ((int64_t)v * (D / 2) + c2) * 32);         \
            for (int r = 0; r < QR; r++) {                                                                           \
                int32_t pair;                                                                                       \
                memcpy(&pair, q + r * D + 2 * c2, 4);                                                               \
                __m512i qv = _mm512_set1_epi32(pair);                                                               \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)qv, (__m512bh)kv[v]); \
            }                                                                                                       \
        }                                                                                                           \
        for (int r = 0; r < QR; r++)                                                                                 \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(s + r * BC + v * 16, acc[r][v]);                          \
    }
QK_BF16(4)
QK_BF16(1)

#define QK_F32(NV)                                                                                               \
    static inline __attribute__((always_inline)) void qk_f32_##NV(const float *q, int D, const float *kp, float *s) { \
        __m512 acc[QR][NV];                                                                                          \
        for (int r = 0; r < QR; r++)                                                                                 \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();                                           \
        for (int c = 0; c < D; c++) {                                                                               \
            __m512 kv[NV];                                                                                          \
            for (int v = 0; v < NV; v++) kv[v] = _mm512_loadu_ps(kp + ((int64_t)v * D + c) * 16);                   \
            for (int r = 0; r < QR; r++) {                                                                           \
                __m512 qv = _mm512_set1_ps(q[r * D + c]);                                                           \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(qv, kv[v], acc[r][v]);                     \
            }                                                                                                       \
        }                                                                                                           \
        for (int r = 0; r < QR; r++)                                                                                 \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(s + r * BC + v * 16, acc[r][v]);                          \
    }
QK_F32(4)
QK_F32(1)

/* ---- probabilities times values: R queries x NV vectors of 16 output dimensions ---------------------------------- */

#define PV_BF16(R, NV)                                                                                              \
    static void pv_bf16_##R##_##NV(const bf16 *p, int npairs, const bf16 *vp, int dv, float *o) {                   \
        __m512 acc[R][NV];                                                                                          \
        for (int r = 0; r < R; r++)                                                                                 \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_loadu_ps(o + r * dv + v * 16);                          \
        for (int jp = 0; jp < npairs; jp++) {                                                                       \
            __m512i vv[NV];                                                                                         \
            for (int v = 0; v < NV; v++) vv[v] = _mm512_loadu_si512(vp + ((int64_t)jp * dv + v * 16) * 2);          \
            for (int r = 0; r < R; r++) {                                                                           \
                int32_t pair;                                                                                       \
                memcpy(&pair, p + r * BC + 2 * jp, 4);                                                              \
                __m512i pv = _mm512_set1_epi32(pair);                                                               \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)pv, (__m512bh)vv[v]); \
            }                                                                                                       \
        }                                                                                                           \
        for (int r = 0; r < R; r++)                                                                                 \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(o + r * dv + v * 16, acc[r][v]);                          \
    }

#define PV_F32(R, NV)                                                                                               \
    static void pv_f32_##R##_##NV(const float *p, int nkeys, const float *vp, int dv, float *o) {                   \
        __m512 acc[R][NV];                                                                                          \
        for (int r = 0; r < R; r++)                                                                                 \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_loadu_ps(o + r * dv + v * 16);                          \
        for (int j = 0; j < nkeys; j++) {                                                                           \
            __m512 vv[NV];                                                                                          \
            for (int v = 0; v < NV; v++) vv[v] = _mm512_loadu_ps(vp + (int64_t)j * dv + v * 16);                    \
            for (int r = 0; r < R; r++) {                                                                           \
                __m512 pv = _mm512_set1_ps(p[r * BC + j]);                                                          \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(pv, vv[v], acc[r][v]);                     \
            }                                                                                                       \
        }                                                                                                           \
        for (int r = 0; r < R; r++)                                                                                 \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(o + r * dv + v * 16, acc[r][v]);                          \
    }

/* rows x width tiles that fill 24 of the 32 vector registers with accumulators (20 at width 5) */
PV_BF16(8, 1) PV_BF16(8, 2) PV_BF16(8, 3) PV_BF16(6, 4) PV_BF16(4, 5)
PV_F32(8, 1) PV_F32(8, 2) PV_F32(8, 3) PV_F32(6, 4) PV_F32(4, 5)

/* how many of the remaining 16-wide output vectors the next product takes (at most 5, in even parts) */
static inline int pv_width(int rest) { return rest <= 5 ? rest : (rest <= 10 ? (rest + 1) / 2 : 5); }

static void pv_block(const problem_t *pb, scratch_t *sc, const void *vp_block, int nkeys) {
    int dv = pb->dv, np = (nkeys + 1) / 2;
    for (int c = 0; c < dv / 16;) {
        int w = pv_width(dv / 16 - c), rows = w <= 3 ? 8 : (w == 4 ? 6 : 4);
        for (int r0 = 0; r0 < BR; r0 += rows) {
            float *o = sc->o + r0 * dv + c * 16;
            if (pb->bf) {
                const bf16 *p = sc->p + r0 * BC, *vp = (const bf16 *)vp_block + c * 16 * 2;
                switch (w) {
                    case 1: pv_bf16_8_1(p, np, vp, dv, o); break;
                    case 2: pv_bf16_8_2(p, np, vp, dv, o); break;
                    case 3: pv_bf16_8_3(p, np, vp, dv, o); break;
                    case 4: pv_bf16_6_4(p, np, vp, dv, o); break;
                    default: pv_bf16_4_5(p, np, vp, dv, o); break;
                }
            } else {
                const float *p = sc->s + r0 * BC, *vp = (const float *)vp_block + c * 16;
                switch (w) {
                    case 1: pv_f32_8_1(p, nkeys, vp, dv, o); break;
                    case 2: pv_f32_8_2(p, nkeys, vp, dv, o); break;
                    case 3: pv_f32_8_3(p, nkeys, vp, dv, o); break;
                    case 4: pv_f32_6_4(p, nkeys, vp, dv, o); break;
                    default: pv_f32_4_5(p, nkeys, vp, dv, o); break;
                }
            }
        }
        c += w;
    }
}

/* ---- one task: BR queries of one (batch, head) against all its keys ------------------------------------------- */

static inline __mmask16 lanes(int left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

/* Online softmax over one block of nkeys scores per query: the running maximum m (of raw scores; the scale is
 * positive), e = 2^((s - m) * scale * log2 e) as probabilities, the running sum l, and the accumulated output scaled
 * by 2^((m_old - m_new) * ...) where the maximum moved. Lanes past nkeys give probability 0. */
static void softmax_rows(const problem_t *pb, scratch_t *sc, int nkeys) {
    int nvec = (nkeys + 15) / 16;
    float c = pb->scale * 1.44269504088896341f;
    __m512 cv = _mm512_set1_ps(c);
    for (int r = 0; r < BR; r++) {
        float *s = sc->s + r * BC;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int v = 0; v < nvec; v++)
            mx = _mm512_mask_max_ps(mx, lanes(nkeys - v * 16), mx, _mm512_loadu_ps(s + v * 16));
        float m_new = fmaxf(sc->m[r], _mm512_reduce_max_ps(mx));
        float corr = exp2f((sc->m[r] - m_new) * c);  /* 0 for the first block (m = -inf) */
        __m512 shift = _mm512_set1_ps(m_new * c), sum = _mm512_setzero_ps();
        for (int v = 0; v < nvec; v++) {
            __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + v * 16), cv, shift), !pb->bf);
            if (v == nvec - 1) e = _mm512_maskz_mov_ps(lanes(nkeys - v * 16), e);
            sum = _mm512_add_ps(sum, e);
            if (pb->bf)
                _mm256_storeu_si256((__m256i *)(sc->p + r * BC + v * 16), (__m256i)_mm512_cvtneps_pbh(e));
            else
                _mm512_storeu_ps(s + v * 16, e);
        }
        sc->l[r] = sc->l[r] * corr + _mm512_reduce_add_ps(sum);
        sc->m[r] = m_new;
        if (corr != 1.0f) {
            __m512 k = _mm512_set1_ps(corr);
            float *o = sc->o + r * pb->dv;
            for (int j = 0; j < pb->dv; j += 16) _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), k));
        }
    }
}

static void run_task(problem_t *pb, scratch_t *sc, int task) {
    int bh = task / pb->nqb, i0 = (task % pb->nqb) * BR;
    int b = bh / pb->H, h = bh % pb->H, D = pb->D, dv = pb->dv;
    int rows = pb->Lq - i0 < BR ? pb->Lq - i0 : BR;
    /* the block's queries, rows past Lq zero */
    for (int r = 0; r < BR; r++) {
        int64_t off = b * pb->qb + (int64_t)(i0 + r) * pb->qr + (int64_t)h * D;
        if (pb->bf) {
            if (r < rows) memcpy(sc->qt.h + r * D, (const bf16 *)pb->q + off, D * 2);
            else memset(sc->qt.h + r * D, 0, D * 2);
        } else {
            if (r < rows) memcpy(sc->qt.f + r * D, (const float *)pb->q + off, D * 4);
            else memset(sc->qt.f + r * D, 0, D * 4);
        }
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
    memset(sc->o, 0, sizeof(float) * BR * dv);
    for (int j0 = 0; j0 < pb->Lk; j0 += BC) {
        int nkeys = pb->Lk - j0 < BC ? pb->Lk - j0 : BC, nvec = (nkeys + 15) / 16, jv0 = j0 / 16;
        for (int r0 = 0; r0 < BR; r0 += QR) {
            int v = 0;
            float *s = sc->s + r0 * BC;
            if (pb->bf) {
                const bf16 *kp = (const bf16 *)pb->kp + bh * pb->kp_head + (int64_t)jv0 * 16 * D, *q = sc->qt.h + r0 * D;
                for (; v + 4 <= nvec; v += 4) qk_bf16_4(q, D, kp + (int64_t)v * 16 * D, s + v * 16);
                for (; v < nvec; v++) qk_bf16_1(q, D, kp + (int64_t)v * 16 * D, s + v * 16);
            } else {
                const float *kp = (const float *)pb->kp + bh * pb->kp_head + (int64_t)jv0 * 16 * D, *q = sc->qt.f + r0 * D;
                for (; v + 4 <= nvec; v += 4) qk_f32_4(q, D, kp + (int64_t)v * 16 * D, s + v * 16);
                for (; v < nvec; v++) qk_f32_1(q, D, kp + (int64_t)v * 16 * D, s + v * 16);
            }
        }
        softmax_rows(pb, sc, nkeys);
        const void *vp_block = pb->bf ? (const void *)((const bf16 *)pb->vp + bh * pb->vp_head + (int64_t)j0 * dv)
                                      : (const void *)((const float *)pb->vp + bh * pb->vp_head + (int64_t)j0 * dv);
        pv_block(pb, sc, vp_block, nkeys);
    }
    /* out = o / l, rows that exist only */
    for (int r = 0; r < rows; r++) {
        int64_t off = b * pb->ob + (int64_t)(i0 + r) * pb->or_ + (int64_t)h * D;
        __m512 inv = _mm512_set1_ps(1.0f / sc->l[r]);
        for (int c = 0; c < D; c += 16) {
            __mmask16 valid = lanes(D - c);
            __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sc->o + r * dv + c), inv);
            if (pb->bf)
                _mm256_mask_storeu_epi16((bf16 *)pb->out + off + c, valid, (__m256i)_mm512_cvtneps_pbh(x));
            else
                _mm512_mask_storeu_ps((float *)pb->out + off + c, valid, x);
        }
    }
}

/* ---- threads -------------------------------------------------------------------------------------------------- */

typedef struct {
    problem_t *pb;
    int phase;  /* 0: pack the heads, 1: attend */
    int ok;
} worker_t;

static void *work(void *arg) {
    worker_t *w = (worker_t *)arg;
    problem_t *pb = w->pb;
    if (w->phase == 0) {
        for (int t; (t = atomic_fetch_add(&pb->next, 1)) < pb->B * pb->H;) pack_head(pb, t);
        return NULL;
    }
    scratch_t *sc = aligned_alloc(64, sizeof(scratch_t));
    if (!sc) { w->ok = 0; return NULL; }
    int ntasks = pb->B * pb->H * pb->nqb;
    for (int t; (t = atomic_fetch_add(&pb->next, 1)) < ntasks;) run_task(pb, sc, t);
    free(sc);
    return NULL;
}

/* the workers, nthreads - 1 of them in new threads and one in this one; 0 if a scratch could not be allocated */
static int run_phase(problem_t *pb, int phase, int nthreads) {
    pthread_t ids[MAX_THREADS];
    worker_t ws[MAX_THREADS];
    int started[MAX_THREADS];
    atomic_store(&pb->next, 0);
    for (int i = 0; i < nthreads; i++) {
        ws[i].pb = pb; ws[i].phase = phase; ws[i].ok = 1;
        started[i] = i > 0 && pthread_create(&ids[i], NULL, work, &ws[i]) == 0;
    }
    work(&ws[0]);  /* tasks a thread that did not start would have taken are taken by the others */
    int ok = ws[0].ok;
    for (int i = 1; i < nthreads; i++)
        if (started[i]) { pthread_join(ids[i], NULL); ok &= ws[i].ok; }
    return ok;
}

/* ---- entry ---------------------------------------------------------------------------------------------------- */

/* 0 on success; 1: arguments it does not take (nothing written); 2: out of memory (out may be partly written). */
int latentdiff_attention(const void *q, const void *k, const void *v, void *out, int bf, int B, int Lq, int Lk, int H,
                         int D, const int64_t *strides, float scale, int nthreads) {
    if (B < 1 || Lq < 1 || Lk < 1 || H < 1 || D < 2 || D % 2 || D > MAX_D) return 1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    problem_t pb = {0};
    pb.q = q; pb.k = k; pb.v = v; pb.out = out;
    pb.qb = strides[0]; pb.qr = strides[1]; pb.kb = strides[2]; pb.kr = strides[3];
    pb.vb = strides[4]; pb.vr = strides[5]; pb.ob = strides[6]; pb.or_ = strides[7];
    pb.B = B; pb.Lq = Lq; pb.Lk = Lk; pb.H = H; pb.D = D; pb.scale = scale; pb.bf = bf;
    pb.nkv = (Lk + 15) / 16;
    pb.dv = (D + 15) / 16 * 16;
    pb.nqb = (Lq + BR - 1) / BR;
    int elem = bf ? 2 : 4;
    /* whole blocks of BC keys are read, so pad both to a multiple of BC */
    int64_t keys = ((int64_t)Lk + BC - 1) / BC * BC;
    pb.kp_head = keys * D;
    pb.vp_head = keys * pb.dv;
    size_t kbytes = (size_t)B * H * pb.kp_head * elem, vbytes = (size_t)B * H * pb.vp_head * elem;
    pb.kp = aligned_alloc(64, (kbytes + 63) / 64 * 64);
    pb.vp = aligned_alloc(64, (vbytes + 63) / 64 * 64);
    if (!pb.kp || !pb.vp) { free(pb.kp); free(pb.vp); return 2; }
    run_phase(&pb, 0, nthreads);
    int ok = run_phase(&pb, 1, nthreads);
    free(pb.kp);
    free(pb.vp);
    return ok ? 0 : 2;
}
