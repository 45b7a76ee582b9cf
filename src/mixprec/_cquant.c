/* Bit-exact rounding of float32/float64 arrays to a narrower float format.
 *
 * The kernel works on the bit pattern of the input.  With a = |x| as an unsigned
 * integer, field = a >> MW, sig = the significand with its implicit bit, and
 *
 *     shift = (MW - M) + max(0, te - max(field, 1))
 *
 * (te = biased input exponent of the format's smallest normal), the format keeps
 * sig >> shift and drops low = sig mod 2^shift.  For shift <= MW the result is
 * a - low (+ 2^shift when rounding up): the carry walks into the exponent field by
 * itself.  For larger shifts the value is below the format's smallest subnormal Q
 * and the result is 0 or Q.
 *
 *   nearest      up = low > half, or low == half and the kept code is odd
 *                (never when shift > MW + 1: the value is below Q / 2)
 *   stochastic   up = r < low / 2^shift for a uniform r (see stochastic_up): P exact
 *   toward_zero  up = 0
 *
 * then overflow (rounded result > max), +-inf and NaN take the patterns the caller
 * computed from the format's convention.  Every parameter is derived in
 * mixprec/quant.py from (ebits, mbits, bias, convention); the pure-torch path there
 * runs the same algorithm with the same random bits (SplitMix64 of the seed and the
 * flat element index), so both paths give identical results.
 *
 * Integer-only: no floating-point instruction touches the data, so the result does not
 * depend on the FPU rounding mode or on flush-to-zero settings.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <pthread.h>
#include <string.h>

#define MODE_NEAREST 0
#define MODE_STOCHASTIC 1
#define MODE_TOWARD_ZERO 2
#define MAX_THREADS 64
#define MIN_PER_THREAD 65536

typedef struct {
    int64_t s0, te, m0, m0_adj, unsigned_zero;
    uint64_t max_bits, q_bits, inf_bits, nan_bits, ovf_bits, infin_bits;
} plan_t;

/* SplitMix64: output number k+1 of the generator whose state starts at `seed`. */
static inline uint64_t splitmix(uint64_t seed, uint64_t k) {
    uint64_t z = seed + (k + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* The uniform r in [0, 1) of element i is 0.(31 bits of A_i)(63 bits of B_i):
 *   A_i = 32-bit word i of splitmix(seed, 0), splitmix(seed, 1), ... (low word first), >> 1
 *   B_i = splitmix(seed ^ SEED_B, i) >> 1
 * and stochastic rounding goes up iff r < low / 2^shift.  With shift <= 31 the first
 * 31 bits decide exactly; otherwise B is read only when A ties with the top bits of
 * the fraction (probability 2^-31). */
#define SEED_B 0xD1B54A32D192ED03ULL

static inline uint64_t word_a(uint64_t seed, uint64_t i) {
    return (uint32_t)(splitmix(seed, i >> 1) >> (32 * (i & 1))) >> 1;
}

static inline int stochastic_up(uint64_t low, uint64_t shift, uint64_t seed, uint64_t i) {
    uint64_t a = word_a(seed, i);
    if (shift <= 31) return a < (low << (31 - shift));
    uint64_t s = shift - 31;                       /* fraction bits below A's 31 */
    uint64_t top = s < 64 ? low >> s : 0;
    if (a != top) return a < top;
    uint64_t rem = s < 63 ? low & (((uint64_t)1 << s) - 1) : low;   /* low < 2^54 */
    uint64_t thr = s <= 63 ? rem << (63 - s) : (s - 63 < 64 ? rem >> (s - 63) : 0);
    return (splitmix(seed ^ SEED_B, i) >> 1) < thr;
}

/* AVX-512 and AVX2 clones picked at load time; x86-64-v4 as an arch name needs GCC 11. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* out[j] = splitmix(seed, k0 + j) for j < n, four at a time in vector registers (GCC
 * vector extensions; where the target lacks 64-bit vector multiplies the compiler
 * composes them from 32-bit ones).  Same numbers as the scalar splitmix. */
typedef uint64_t u64x4 __attribute__((vector_size(32)));

static inline void splitmix_run(uint64_t *out, uint64_t seed, uint64_t k0, int64_t n) {
    const uint64_t G = 0x9E3779B97F4A7C15ULL;
    int64_t j = 0;
    u64x4 z = {seed + (k0 + 1) * G, seed + (k0 + 2) * G, seed + (k0 + 3) * G,
               seed + (k0 + 4) * G};
    const u64x4 step = {4 * G, 4 * G, 4 * G, 4 * G};
    for (; j + 4 <= n; j += 4) {
        u64x4 v = z;
        v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ULL;
        v = (v ^ (v >> 27)) * 0x94D049BB133111EBULL;
        v = v ^ (v >> 31);
        memcpy(out + j, &v, sizeof v);
        z += step;
    }
    for (; j < n; j++) out[j] = splitmix(seed, k0 + (uint64_t)j);
}

#define PLAN_LOCALS(UINT, MW)                                                          \
    const UINT SIGN = (UINT)1 << (sizeof(UINT) * 8 - 1);                               \
    const UINT MMASK = ((UINT)1 << MW) - 1;                                            \
    const UINT s0 = (UINT)pl->s0, m0 = (UINT)pl->m0, m0_adj = (UINT)pl->m0_adj;       \
    const UINT te = (UINT)pl->te;                                                      \
    const UINT max_bits = (UINT)pl->max_bits, q_bits = (UINT)pl->q_bits;               \
    const UINT inf_bits = (UINT)pl->inf_bits, nan_bits = (UINT)pl->nan_bits;           \
    const UINT ovf_bits = (UINT)pl->ovf_bits, infin_bits = (UINT)pl->infin_bits;       \
    const UINT uz = (UINT)pl->unsigned_zero;                                           \
    (void)m0; (void)m0_adj;

/* a = |x|, shift, the clamped shift sh <= MW + 1, significand sig, dropped bits low */
#define SPLIT(UINT, MW, B)                                                             \
    UINT sign = (B) & SIGN, a = (B) ^ sign;                                            \
    UINT field = a >> MW;                                                              \
    UINT f1 = field ? field : 1;  /* same width as the data: no 64-bit lanes */        \
    UINT shift = s0 + (te > f1 ? te - f1 : 0);                                         \
    UINT sh = shift < MW + 1 ? shift : MW + 1;                                         \
    UINT sig = field ? (a & MMASK) | (MMASK + 1) : a;                                  \
    UINT low = sig & (((UINT)1 << sh) - 1);

/* rounded magnitude, then overflow, inf, NaN and the sign */
#define FINISH(UINT, MW, UP, OUT)                                                      \
    {                                                                                  \
        UINT r = shift <= MW ? a - low + ((UP) << sh) : ((UP) ? q_bits : 0);           \
        r = r > max_bits ? ovf_bits : r;                                               \
        r = a == inf_bits ? infin_bits : r;                                            \
        r = a > inf_bits ? nan_bits : r;                                               \
        sign = (uz & ((r == 0) | (r == nan_bits))) ? 0 : sign;                         \
        OUT = r | sign;                                                                \
    }

/* Nearest and toward-zero: one flat loop each, vectorized without branches. */
#define DEFINE_LOOP(NAME, UINT, MW, MODE)                                              \
MULTIVERSION static void NAME(const UINT *src, UINT *dst, int64_t begin, int64_t end,  \
                              const plan_t *pl, uint64_t seed) {                       \
    PLAN_LOCALS(UINT, MW)                                                              \
    (void)seed;                                                                        \
    for (int64_t i = begin; i < end; i++) {                                            \
        SPLIT(UINT, MW, src[i])                                                        \
        UINT up = 0;                                                                   \
        if (MODE == MODE_NEAREST) {                                                    \
            UINT lsb = (sig >> sh) & 1;                                                \
            lsb = (m0 & (shift == s0)) ? ((field + m0_adj) & 1) : lsb;                 \
            UINT twice = low << 1, full = (UINT)1 << sh;                               \
            up = ((twice > full) | ((twice == full) & lsb)) & (shift <= MW + 1);      \
        }                                                                              \
        FINISH(UINT, MW, up, dst[i])                                                   \
    }                                                                                  \
}

/* Stochastic: blocks of BLOCK elements.  The A words of a block are made first (one
 * SplitMix64 serves two elements), then a flat loop decides with the 31 bits of A; a
 * block where some element needs B (A tied with the fraction's top bits) is redone
 * element by element with stochastic_up.  In-place calls go through a block buffer so
 * that the redo still sees the input. */
#define BLOCK 1024
#define DEFINE_STOCHASTIC(NAME, UINT, MW)                                              \
MULTIVERSION static void NAME(const UINT *src, UINT *dst, int64_t begin, int64_t end,  \
                              const plan_t *pl, uint64_t seed) {                       \
    PLAN_LOCALS(UINT, MW)                                                              \
    const UINT BITS = sizeof(UINT) * 8;                                                \
    uint64_t pairs[BLOCK / 2 + 1];                                                     \
    uint32_t words[BLOCK + 2];                                                         \
    UINT tmp[BLOCK], flags[BLOCK];                                                     \
    for (int64_t blk = begin; blk < end; blk += BLOCK) {                               \
        int64_t len = end - blk < BLOCK ? end - blk : BLOCK;                           \
        int64_t k0 = blk >> 1, npairs = ((blk & 1) + len + 1) >> 1;                    \
        splitmix_run(pairs, seed, (uint64_t)k0, npairs);                               \
        for (int64_t k = 0; k < npairs; k++) {                                         \
            words[2 * k] = (uint32_t)pairs[k];                                         \
            words[2 * k + 1] = (uint32_t)(pairs[k] >> 32);                             \
        }                                                                              \
        const uint32_t *w = words + (blk & 1);                                         \
        const UINT *in = src + blk;                                                    \
        UINT *out = (src == dst) ? tmp : dst + blk;                                    \
        UINT need = 0;                                                                 \
        for (int64_t j = 0; j < len; j++) { /* (a reduction here stops vectorization) */ \
            SPLIT(UINT, MW, in[j])                                                     \
            UINT ra = w[j] >> 1;                                                       \
            UINT top = shift <= 31 ? low << (31 - shift)                               \
                                   : (shift - 31 < BITS ? low >> (shift - 31) : 0);    \
            UINT up = ra < top;                                                        \
            flags[j] = (shift > 31) & (ra == top);                                     \
            FINISH(UINT, MW, up, out[j])                                               \
        }                                                                              \
        for (int64_t j = 0; j < len; j++) need |= flags[j];                            \
        if (need) {                                                                    \
            for (int64_t j = 0; j < len; j++) {                                        \
                SPLIT(UINT, MW, in[j])                                                 \
                UINT up = (UINT)stochastic_up(low, shift, seed, (uint64_t)(blk + j));  \
                FINISH(UINT, MW, up, out[j])                                           \
            }                                                                          \
        }                                                                              \
        if (out == tmp) memcpy(dst + blk, tmp, (size_t)len * sizeof(UINT));            \
    }                                                                                  \
}

DEFINE_LOOP(loop_f32_nearest, uint32_t, 23, MODE_NEAREST)
DEFINE_STOCHASTIC(loop_f32_stochastic, uint32_t, 23)
DEFINE_LOOP(loop_f32_toward_zero, uint32_t, 23, MODE_TOWARD_ZERO)
DEFINE_LOOP(loop_f64_nearest, uint64_t, 52, MODE_NEAREST)
DEFINE_STOCHASTIC(loop_f64_stochastic, uint64_t, 52)
DEFINE_LOOP(loop_f64_toward_zero, uint64_t, 52, MODE_TOWARD_ZERO)

/* Codes of values that are already representable: s << (E+M) | e << M | m.  Below the
 * format's smallest normal the code is k = sig >> shift, the count of smallest
 * subnormals (the value is exact, so nothing is dropped). */
typedef struct {
    int64_t s0, te, mbits, width;
    uint64_t inf_bits, inf_code, nan_code;
} codes_t;

#define DEFINE_ENCODE(NAME, UINT, MW, OUT_T)                                           \
MULTIVERSION static void NAME(const UINT *src, OUT_T *dst, int64_t begin, int64_t end, \
                              const codes_t *c) {                                      \
    const UINT SIGN = (UINT)1 << (sizeof(UINT) * 8 - 1);                               \
    const UINT MMASK = ((UINT)1 << MW) - 1;                                            \
    const UINT s0 = (UINT)c->s0, mbits = (UINT)c->mbits, width = (UINT)c->width;       \
    const int64_t te = c->te;                                                          \
    const UINT inf_bits = (UINT)c->inf_bits, inf_code = (UINT)c->inf_code;             \
    const UINT nan_code = (UINT)c->nan_code;                                           \
    for (int64_t i = begin; i < end; i++) {                                            \
        UINT b = src[i];                                                               \
        UINT a = b & ~SIGN, sign = b >> (sizeof(UINT) * 8 - 1);                        \
        UINT field = a >> MW;                                                          \
        int64_t d = te - (int64_t)(field ? field : 1);                                 \
        UINT shift = s0 + (UINT)(d > 0 ? d : 0);                                       \
        shift = shift < MW + 1 ? shift : MW + 1;                                       \
        UINT sig = field ? (a & MMASK) | (MMASK + 1) : a;                              \
        UINT normal = ((field - (UINT)te + 1) << mbits) | ((a & MMASK) >> s0);         \
        UINT mag = (int64_t)field >= te ? normal : sig >> shift;                       \
        mag = a == inf_bits ? inf_code : mag;                                          \
        UINT code = mag | (sign << width);                                             \
        dst[i] = (OUT_T)(a > inf_bits ? nan_code : code);                              \
    }                                                                                  \
}

DEFINE_ENCODE(encode_f32_u8, uint32_t, 23, uint8_t)
DEFINE_ENCODE(encode_f32_i32, uint32_t, 23, uint32_t)
DEFINE_ENCODE(encode_f64_u8, uint64_t, 52, uint8_t)
DEFINE_ENCODE(encode_f64_i32, uint64_t, 52, uint32_t)

/* ReLU masks of 16-bit floats (float16 or bfloat16 bits, told apart by inf_bits):
 * bit (i & 7) of byte i >> 3 is 1 where relu's backward passes the gradient, that is
 * where the value is not <= 0: positive, or NaN of either sign.  With m = |bits|:
 *     keep = m != 0 && (sign == 0 || m > inf_bits)
 * Ranges start at multiples of 64 elements (see run_parallel), so no two threads write
 * the same byte. */
MULTIVERSION static void relu_mask_loop(const uint16_t *src, uint8_t *dst, int64_t begin,
                                        int64_t end, uint16_t inf_bits) {
    int64_t full_end = begin + ((end - begin) & ~(int64_t)7);
    for (int64_t j = begin >> 3; j < full_end >> 3; j++) {
        uint8_t byte = 0;
        for (int k = 0; k < 8; k++) {
            uint16_t h = src[8 * j + k], m = h & 0x7FFF;
            byte |= (uint8_t)((m != 0) & ((h >> 15) == 0 || m > inf_bits)) << k;
        }
        dst[j] = byte;
    }
    if (full_end < end) {
        uint8_t byte = 0;
        for (int64_t i = full_end; i < end; i++) {
            uint16_t h = src[i], m = h & 0x7FFF;
            byte |= (uint8_t)((m != 0) & ((h >> 15) == 0 || m > inf_bits)) << (i & 7);
        }
        dst[full_end >> 3] = byte;
    }
}

/* out[i] = g[i] where mask bit i is set, else +0 (the bit pattern 0). */
#define DEFINE_MASKED(NAME, UINT)                                                      \
MULTIVERSION static void NAME(const uint8_t *mask, const UINT *g, UINT *out,           \
                              int64_t begin, int64_t end) {                            \
    for (int64_t i = begin; i < end; i++) {                                            \
        UINT bit = (mask[i >> 3] >> (i & 7)) & 1;                                      \
        out[i] = g[i] & (UINT)(0 - bit);                                               \
    }                                                                                  \
}
DEFINE_MASKED(masked_u16, uint16_t)
DEFINE_MASKED(masked_u32, uint32_t)

enum { JOB_ROUND, JOB_ENCODE, JOB_MASK, JOB_MASKED };

typedef struct {
    const void *src;
    void *dst;
    int64_t begin, end;
    const plan_t *plan;     /* rounding jobs */
    const codes_t *codes;   /* encoding jobs */
    uint64_t seed;
    int is_f64, mode, wide_codes;
    int kind;               /* JOB_* */
    const void *aux;        /* masked: the gradient */
    uint64_t param;         /* mask: inf_bits; masked: item size */
} job_t;

static void run_encode(const job_t *j) {
    if (j->is_f64 && j->wide_codes)
        encode_f64_i32((const uint64_t *)j->src, (uint32_t *)j->dst, j->begin, j->end, j->codes);
    else if (j->is_f64)
        encode_f64_u8((const uint64_t *)j->src, (uint8_t *)j->dst, j->begin, j->end, j->codes);
    else if (j->wide_codes)
        encode_f32_i32((const uint32_t *)j->src, (uint32_t *)j->dst, j->begin, j->end, j->codes);
    else
        encode_f32_u8((const uint32_t *)j->src, (uint8_t *)j->dst, j->begin, j->end, j->codes);
}

static void run_job(const job_t *j) {
    if (j->kind == JOB_ENCODE) {
        run_encode(j);
        return;
    }
    if (j->kind == JOB_MASK) {
        relu_mask_loop((const uint16_t *)j->src, (uint8_t *)j->dst, j->begin, j->end,
                       (uint16_t)j->param);
        return;
    }
    if (j->kind == JOB_MASKED) {
        if (j->param == 2)
            masked_u16((const uint8_t *)j->src, (const uint16_t *)j->aux, (uint16_t *)j->dst,
                       j->begin, j->end);
        else
            masked_u32((const uint8_t *)j->src, (const uint32_t *)j->aux, (uint32_t *)j->dst,
                       j->begin, j->end);
        return;
    }
    static void (*const f32[3])(const uint32_t *, uint32_t *, int64_t, int64_t,
                                const plan_t *, uint64_t) = {
        loop_f32_nearest, loop_f32_stochastic, loop_f32_toward_zero};
    static void (*const f64[3])(const uint64_t *, uint64_t *, int64_t, int64_t,
                                const plan_t *, uint64_t) = {
        loop_f64_nearest, loop_f64_stochastic, loop_f64_toward_zero};
    if (j->is_f64)
        f64[j->mode]((const uint64_t *)j->src, (uint64_t *)j->dst, j->begin, j->end,
                     j->plan, j->seed);
    else
        f32[j->mode]((const uint32_t *)j->src, (uint32_t *)j->dst, j->begin, j->end,
                     j->plan, j->seed);
}

static void *thread_main(void *arg) {
    run_job((const job_t *)arg);
    return NULL;
}

/* Split [0, n) into contiguous ranges, one per thread; the random bits depend on the
 * element index only, so the split does not change the result. */
static void run_parallel(job_t base, int64_t n, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((int64_t)nthreads > n / MIN_PER_THREAD) nthreads = (int)(n / MIN_PER_THREAD);
    if (nthreads < 1) nthreads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t chunk = (n + nthreads - 1) / nthreads;
    chunk = (chunk + 63) & ~(int64_t)63;   /* keep chunk starts cache-line aligned */
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = base;
        jobs[t].begin = (int64_t)t * chunk < n ? (int64_t)t * chunk : n;
        jobs[t].end = (int64_t)(t + 1) * chunk < n ? (int64_t)(t + 1) * chunk : n;
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&tids[t], NULL, thread_main, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else run_job(&jobs[t]);   /* thread creation failed: do its share here */
    }
}

PyDoc_STRVAR(round_doc,
"round_bits(src_ptr, dst_ptr, n, is_f64, mode, seed, nthreads, s0, te, m0, m0_adj,\n"
"           unsigned_zero, max_bits, q_bits, inf_bits, nan_bits, ovf_bits, infin_bits)\n"
"\n"
"Round n contiguous float32 (is_f64=0) or float64 values at src_ptr into dst_ptr\n"
"(which may equal src_ptr).  mode: 0 nearest-even, 1 stochastic, 2 toward zero.\n"
"The plan parameters come from mixprec.quant; the GIL is released while it runs.");

static PyObject *round_bits(PyObject *self, PyObject *args) {
    unsigned long long src, dst, seed;
    long long n;
    int is_f64, mode, nthreads;
    long long s0, te, m0, m0_adj, uz;
    unsigned long long max_bits, q_bits, inf_bits, nan_bits, ovf_bits, infin_bits;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLiiKiLLLLLKKKKKK", &src, &dst, &n, &is_f64, &mode,
                          &seed, &nthreads, &s0, &te, &m0, &m0_adj, &uz, &max_bits,
                          &q_bits, &inf_bits, &nan_bits, &ovf_bits, &infin_bits))
        return NULL;
    if (mode < 0 || mode > 2) {
        PyErr_Format(PyExc_ValueError, "mode %d not in {0, 1, 2}", mode);
        return NULL;
    }
    int mw = is_f64 ? 52 : 23;
    if (s0 < 0 || s0 > mw || te < 1) {
        PyErr_Format(PyExc_ValueError, "plan out of range: s0=%lld te=%lld", s0, te);
        return NULL;
    }
    if (n <= 0) Py_RETURN_NONE;
    plan_t plan = {s0, te, m0, m0_adj, uz, max_bits, q_bits, inf_bits, nan_bits,
                   ovf_bits, infin_bits};
    job_t base = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, 0, n, &plan, NULL,
                  (uint64_t)seed, is_f64, mode, 0, JOB_ROUND, NULL, 0};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(base, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(encode_doc,
"encode_codes(src_ptr, dst_ptr, n, is_f64, wide_codes, nthreads, s0, te, mbits, width,\n"
"             inf_bits, inf_code, nan_code)\n"
"\n"
"Write the codes s << width | e << mbits | m of n representable float32/float64 values\n"
"as uint8 (wide_codes=0) or 32-bit (wide_codes=1) integers.");

static PyObject *encode_codes(PyObject *self, PyObject *args) {
    unsigned long long src, dst, inf_bits, inf_code, nan_code;
    long long n, s0, te, mbits, width;
    int is_f64, wide, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLiiiLLLLKKK", &src, &dst, &n, &is_f64, &wide, &nthreads,
                          &s0, &te, &mbits, &width, &inf_bits, &inf_code, &nan_code))
        return NULL;
    int mw = is_f64 ? 52 : 23;
    if (s0 < 0 || s0 > mw || te < 1 || width < 1 || width > 31) {
        PyErr_Format(PyExc_ValueError, "code plan out of range: s0=%lld te=%lld width=%lld",
                     s0, te, width);
        return NULL;
    }
    if (n <= 0) Py_RETURN_NONE;
    codes_t codes = {s0, te, mbits, width, inf_bits, inf_code, nan_code};
    job_t base = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, 0, n, NULL, &codes,
                  0, is_f64, 0, wide, JOB_ENCODE, NULL, 0};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(base, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(relu_mask_doc,
"relu_mask(src_ptr, dst_ptr, n, inf_bits, nthreads)\n"
"\n"
"Pack the ReLU backward mask of n 16-bit floats (float16: inf_bits=0x7C00, bfloat16:\n"
"0x7F80) into ceil(n / 8) bytes: bit i & 7 of byte i >> 3 is set where the value is\n"
"positive or NaN.");

static PyObject *relu_mask(PyObject *self, PyObject *args) {
    unsigned long long src, dst, inf_bits;
    long long n;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLKi", &src, &dst, &n, &inf_bits, &nthreads)) return NULL;
    if (inf_bits != 0x7C00 && inf_bits != 0x7F80) {
        PyErr_Format(PyExc_ValueError, "inf_bits 0x%llx not in {0x7C00, 0x7F80}", inf_bits);
        return NULL;
    }
    if (n <= 0) Py_RETURN_NONE;
    job_t base = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, 0, n, NULL, NULL,
                  0, 0, 0, 0, JOB_MASK, NULL, inf_bits};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(base, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(masked_doc,
"masked_grad(mask_ptr, g_ptr, out_ptr, n, itemsize, nthreads)\n"
"\n"
"out[i] = g[i] where bit i of the packed mask is set, else +0; itemsize 2 or 4.");

static PyObject *masked_grad(PyObject *self, PyObject *args) {
    unsigned long long mask, g, out;
    long long n, itemsize;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKLLi", &mask, &g, &out, &n, &itemsize, &nthreads))
        return NULL;
    if (itemsize != 2 && itemsize != 4) {
        PyErr_Format(PyExc_ValueError, "itemsize %lld not in {2, 4}", itemsize);
        return NULL;
    }
    if (n <= 0) Py_RETURN_NONE;
    job_t base = {(const void *)(uintptr_t)mask, (void *)(uintptr_t)out, 0, n, NULL, NULL,
                  0, 0, 0, 0, JOB_MASKED, (const void *)(uintptr_t)g, (uint64_t)itemsize};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(base, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"relu_mask", relu_mask, METH_VARARGS, relu_mask_doc},
    {"masked_grad", masked_grad, METH_VARARGS, masked_doc},
    {"round_bits", round_bits, METH_VARARGS, round_doc},
    {"encode_codes", encode_codes, METH_VARARGS, encode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cquant",
    "C kernels for mixprec.quant: integer rounding of float32/float64 bit patterns.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cquant(void) { return PyModule_Create(&module); }
