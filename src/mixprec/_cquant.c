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
 * depend on the FPU rounding mode or on flush-to-zero settings.  The MX kernel is the
 * exception: it scales with float32 products, as the torch ops it replaces do, and its
 * nearest loop for blocks of 32 rounds values below the format's normals with a float32
 * addition, which assumes the default rounding mode (round to nearest-even) that torch
 * also runs under; flush-to-zero does not change what that addition gives.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <pthread.h>
#include <stdlib.h>
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

/* out[j] = splitmix(seed, k0 + j) for j < n, eight at a time in vector registers (GCC
 * vector extensions: one AVX-512 register, two AVX2 ones; where the target lacks 64-bit
 * vector multiplies the compiler composes them from 32-bit ones).  Same numbers as the
 * scalar splitmix. */
typedef uint64_t u64x8 __attribute__((vector_size(64)));

static inline void splitmix_run(uint64_t *out, uint64_t seed, uint64_t k0, int64_t n) {
    const uint64_t G = 0x9E3779B97F4A7C15ULL;
    int64_t j = 0;
    u64x8 z;
    for (int l = 0; l < 8; l++) z[l] = seed + (k0 + 1 + (uint64_t)l) * G;
    const u64x8 step = {8 * G, 8 * G, 8 * G, 8 * G, 8 * G, 8 * G, 8 * G, 8 * G};
    for (; j + 8 <= n; j += 8) {
        u64x8 v = z;
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
                              const plan_t *pl, uint64_t seed, int64_t idx0) {         \
    PLAN_LOCALS(UINT, MW)                                                              \
    (void)seed; (void)idx0;                                                            \
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

/* The words of pairs[0..npairs) in the order low, high, low, high...: on a little-endian
 * target that is the memory of the pairs itself (read as uint32_t; the extension is built
 * with -fno-strict-aliasing), elsewhere they are swapped in place. */
static inline const uint32_t *split_words(uint64_t *pairs, int64_t npairs) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    (void)npairs;
#else
    for (int64_t k = 0; k < npairs; k++)
        pairs[k] = (pairs[k] << 32) | (pairs[k] >> 32);
#endif
    return (const uint32_t *)pairs;
}
#define DEFINE_STOCHASTIC(NAME, UINT, MW)                                              \
MULTIVERSION static void NAME(const UINT *src, UINT *dst, int64_t begin, int64_t end,  \
                              const plan_t *pl, uint64_t seed, int64_t idx0) {         \
    PLAN_LOCALS(UINT, MW)                                                              \
    const UINT BITS = sizeof(UINT) * 8;                                                \
    uint64_t pairs[BLOCK / 2 + 1];                                                     \
    UINT tmp[BLOCK], flags[BLOCK];                                                     \
    for (int64_t blk = begin; blk < end; blk += BLOCK) {                               \
        int64_t len = end - blk < BLOCK ? end - blk : BLOCK;                           \
        int64_t gi = idx0 + blk;  /* random index of the block's first element */     \
        int64_t k0 = gi >> 1, npairs = ((gi & 1) + len + 1) >> 1;                      \
        splitmix_run(pairs, seed, (uint64_t)k0, npairs);                               \
        /* the 32-bit words of the pairs, low word first (x86-64 and other             \
         * little-endian targets; elsewhere the pairs are split explicitly) */          \
        const uint32_t *w = split_words(pairs, npairs) + (gi & 1);                     \
        const UINT *in = src + blk;                                                    \
        UINT *out = (src == dst) ? tmp : dst + blk;                                    \
        for (int64_t c0 = 0; c0 < len; c0 += 64) { /* chunks of 64 of the block */      \
            int64_t cl = len - c0 < 64 ? len - c0 : 64;                                \
            const UINT *cin = in + c0;                                                 \
            UINT *cout = out + c0;                                                     \
            const uint32_t *cw = w + c0;                                               \
            UINT need = 0, outside = MW != 23;                                         \
            if (MW == 23) /* float32: is every value a normal of the format? */        \
                for (int64_t j = 0; j < cl; j++)                                       \
                    outside |= (UINT)(((cin[j] >> MW) & 0xFF) - te) >= (UINT)(255 - te); \
            if (!outside) { /* then shift = s0 <= 23 everywhere: A alone decides */    \
                const UINT lowmask = ((UINT)1 << s0) - 1;                              \
                for (int64_t j = 0; j < cl; j++) {                                     \
                    UINT b = cin[j], sign = b & SIGN, a = b ^ sign, low = a & lowmask; \
                    UINT up = (UINT)(cw[j] >> 1) < (low << (31 - s0));                  \
                    UINT r = a - low + (up << s0);                                     \
                    r = r > max_bits ? ovf_bits : r;                                   \
                    sign = (uz & (r == nan_bits)) ? 0 : sign;                          \
                    cout[j] = r | sign;                                                \
                }                                                                      \
                continue;                                                              \
            }                                                                          \
            for (int64_t j = 0; j < cl; j++) { /* (a reduction here stops vectorization) */ \
                SPLIT(UINT, MW, cin[j])                                                \
                UINT ra = cw[j] >> 1;                                                  \
                UINT top = shift <= 31 ? low << (31 - shift)                           \
                                       : (shift - 31 < BITS ? low >> (shift - 31) : 0); \
                UINT up = ra < top;                                                    \
                flags[j] = (shift > 31) & (ra == top);                                 \
                FINISH(UINT, MW, up, cout[j])                                          \
            }                                                                          \
            for (int64_t j = 0; j < cl; j++) need |= flags[j];                         \
            if (need) {                                                                \
                for (int64_t j = 0; j < cl; j++) {                                     \
                    SPLIT(UINT, MW, cin[j])                                            \
                    UINT up = (UINT)stochastic_up(low, shift, seed,                    \
                                                  (uint64_t)(gi + c0 + j));            \
                    FINISH(UINT, MW, up, cout[j])                                      \
                }                                                                      \
            }                                                                          \
        }                                                                              \
        if (out == tmp) memcpy(dst + blk, tmp, (size_t)len * sizeof(UINT));            \
    }                                                                                  \
}

DEFINE_LOOP(loop_f32_nearest_any, uint32_t, 23, MODE_NEAREST)

/* Nearest rounding of float32 bits, fast path: in a chunk where every |x| is a normal
 * of the format (te <= field < 255) the shift is s0 for all elements, so
 *     r = (a + 2^(s0-1) - 1 + ((a >> s0) & 1)) & ~(2^s0 - 1)
 * (the general formula a - low + up * 2^s0 with up = low > half, or low == half and the
 * kept bit odd), then the overflow test and the sign.  Other chunks, and formats without
 * mantissa bits (whose kept bit is the exponent's) or dropping none, take
 * loop_f32_nearest_any. */
#define NEAREST_CHUNK 64
MULTIVERSION static void loop_f32_nearest(const uint32_t *src, uint32_t *dst, int64_t begin,
                                          int64_t end, const plan_t *pl, uint64_t seed,
                                          int64_t idx0) {
    if (pl->m0 || pl->s0 == 0) {   /* (s0 == 0: a 23-bit mantissa, nothing dropped) */
        loop_f32_nearest_any(src, dst, begin, end, pl, seed, idx0);
        return;
    }
    const uint32_t s0 = (uint32_t)pl->s0, te = (uint32_t)pl->te;
    const uint32_t bias = ((uint32_t)1 << (s0 - 1)) - 1, keep = ~(((uint32_t)1 << s0) - 1);
    const uint32_t max_bits = (uint32_t)pl->max_bits, ovf_bits = (uint32_t)pl->ovf_bits;
    const uint32_t nan_bits = (uint32_t)pl->nan_bits, uz = (uint32_t)pl->unsigned_zero;
    int64_t i = begin;
    for (; i + NEAREST_CHUNK <= end; i += NEAREST_CHUNK) {
        const uint32_t *in = src + i;
        uint32_t *out = dst + i;
        uint32_t outside = 0;
        for (int k = 0; k < NEAREST_CHUNK; k++)
            outside |= (((in[k] >> 23) & 0xFF) - te) >= 255 - te;
        if (outside) {
            loop_f32_nearest_any(src, dst, i, i + NEAREST_CHUNK, pl, seed, idx0);
            continue;
        }
        for (int k = 0; k < NEAREST_CHUNK; k++) {
            uint32_t b = in[k], sign = b & 0x80000000u, a = b ^ sign;
            uint32_t r = (a + bias + ((a >> s0) & 1)) & keep;
            r = r > max_bits ? ovf_bits : r;
            sign = (uz & (r == nan_bits)) ? 0 : sign;
            out[k] = r | sign;
        }
    }
    if (i < end) loop_f32_nearest_any(src, dst, i, end, pl, seed, idx0);
}
DEFINE_STOCHASTIC(loop_f32_stochastic, uint32_t, 23)
DEFINE_LOOP(loop_f32_toward_zero, uint32_t, 23, MODE_TOWARD_ZERO)
DEFINE_LOOP(loop_f64_nearest, uint64_t, 52, MODE_NEAREST)
DEFINE_STOCHASTIC(loop_f64_stochastic, uint64_t, 52)
DEFINE_LOOP(loop_f64_toward_zero, uint64_t, 52, MODE_TOWARD_ZERO)

typedef void (*f32_loop_t)(const uint32_t *, uint32_t *, int64_t, int64_t, const plan_t *,
                           uint64_t, int64_t);
typedef void (*f64_loop_t)(const uint64_t *, uint64_t *, int64_t, int64_t, const plan_t *,
                           uint64_t, int64_t);
static const f32_loop_t F32_LOOPS[3] = {loop_f32_nearest, loop_f32_stochastic,
                                        loop_f32_toward_zero};
static const f64_loop_t F64_LOOPS[3] = {loop_f64_nearest, loop_f64_stochastic,
                                        loop_f64_toward_zero};

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
    int64_t full_end = begin + ((end - begin) & ~(int64_t)7);                          \
    for (int64_t j = begin >> 3; j < full_end >> 3; j++) {                             \
        UINT m = mask[j];                                                              \
        for (int k = 0; k < 8; k++)                                                    \
            out[8 * j + k] = g[8 * j + k] & (UINT)(0 - ((m >> k) & 1));                \
    }                                                                                  \
    for (int64_t i = full_end; i < end; i++) {                                         \
        UINT bit = (mask[i >> 3] >> (i & 7)) & 1;                                      \
        out[i] = g[i] & (UINT)(0 - bit);                                               \
    }                                                                                  \
}
DEFINE_MASKED(masked_u16, uint16_t)
DEFINE_MASKED(masked_u32, uint32_t)

/* dst[i] = table[src[i]]: 8-bit codes to 32-bit patterns through a 256-entry table. */
MULTIVERSION static void lut_loop(const uint8_t *src, uint32_t *dst, const uint32_t *table,
                                  int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) dst[i] = table[src[i]];
}

enum { JOB_ROUND, JOB_ENCODE, JOB_MASK, JOB_MASKED, JOB_LUT, JOB_SCALED };

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

/* Per-tensor scaled rounding in one pass:  lp = round(x * s),  values = lp / s (either
 * output skipped when its pointer is 0: the native FP8 GEMMs need only lp),  both
 * float32 operations as torch computes them (IEEE, no reciprocal), x float32 or bfloat16
 * (widened exactly).  The random index is the flat index, as for round_bits on x * s. */
#define SCALED_TILE 1024
MULTIVERSION static void scaled_loop(const job_t *j) {
    const int is_bf16 = (int)(j->param >> 32);
    const uint32_t sbits = (uint32_t)j->param;
    float sc;
    memcpy(&sc, &sbits, 4);
    uint32_t *lp_out = (uint32_t *)(uintptr_t)j->aux;
    float *values = (float *)j->dst;
    uint32_t tmp[SCALED_TILE], q[SCALED_TILE];
    const f32_loop_t round_loop = F32_LOOPS[j->mode];
    for (int64_t t0 = j->begin; t0 < j->end; t0 += SCALED_TILE) {
        int64_t len = j->end - t0 < SCALED_TILE ? j->end - t0 : SCALED_TILE;
        float *tf = (float *)tmp;
        if (is_bf16) {
            const uint16_t *src = (const uint16_t *)j->src + t0;
            for (int64_t k = 0; k < len; k++) {
                uint32_t b = (uint32_t)src[k] << 16;
                float v;
                memcpy(&v, &b, 4);
                tf[k] = v * sc;
            }
        } else {
            const float *src = (const float *)j->src + t0;
            for (int64_t k = 0; k < len; k++) tf[k] = src[k] * sc;
        }
        round_loop(tmp, q, 0, len, j->plan, j->seed, t0);
        const float *qf = (const float *)q;
        if (lp_out) memcpy(lp_out + t0, q, sizeof(uint32_t) * (size_t)len);
        if (values)
            for (int64_t k = 0; k < len; k++) values[t0 + k] = qf[k] / sc;
    }
}

static void run_job(const job_t *j) {
    if (j->kind == JOB_SCALED) {
        scaled_loop(j);
        return;
    }
    if (j->kind == JOB_ENCODE) {
        run_encode(j);
        return;
    }
    if (j->kind == JOB_MASK) {
        relu_mask_loop((const uint16_t *)j->src, (uint8_t *)j->dst, j->begin, j->end,
                       (uint16_t)j->param);
        return;
    }
    if (j->kind == JOB_LUT) {
        lut_loop((const uint8_t *)j->src, (uint32_t *)j->dst, (const uint32_t *)j->aux,
                 j->begin, j->end);
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
    if (j->is_f64)
        F64_LOOPS[j->mode]((const uint64_t *)j->src, (uint64_t *)j->dst, j->begin, j->end,
                           j->plan, j->seed, 0);
    else
        F32_LOOPS[j->mode]((const uint32_t *)j->src, (uint32_t *)j->dst, j->begin, j->end,
                           j->plan, j->seed, 0);
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

/* OCP MX block quantization of float32 x viewed as [outer, n, inner], blocks of `block`
 * along n (the last one padded with zeros).  Per block and inner position k, with
 * a = max |x| over the block as float32 bits (an integer max: NaN bits exceed inf's):
 *     special  = a >= inf bits                 (NaN or inf in the block)
 *     e        = floor(log2 amax) - emax (+1 under "ceil" when amax's significand
 *                exceeds max_elem's, top_mbits);  -127 for an all-zero block
 *     e        = clamp(e, -127, 127);  0 where special
 *     q        = round(x * 2^-e)                (float32 product, then the plan's rounding)
 *     scale    = 2^e, NaN where special;  deq = q * scale, NaN where special
 * which is mixprec.scaling.quantize_mx step by step.  The random index of an element is
 * its flat index in the padded layout [outer, n_blocks, block, inner], so stochastic
 * rounding draws what the torch path draws.  Rows r = o * n_blocks + b are split among
 * threads; results do not depend on the split. */
typedef struct {
    const uint32_t *src;
    uint32_t *deq, *scales, *elems;   /* elems may be NULL */
    int64_t outer, n, inner, block, n_blocks, emax, ceil_rule;
    uint32_t top_mbits;
    const plan_t *plan;
    int mode;
    uint64_t seed;
    int64_t row_begin, row_end;
    int failed;
} mx_job_t;

#define MX_TILE 4096   /* elements rounded per call of the rounding loop */

static inline uint32_t pow2_bits(int64_t e) {   /* 2^e for e in [-127, 127] */
    int64_t b = e + 127;
    return b > 0 ? (uint32_t)b << 23 : (uint32_t)1 << 22;
}

static int64_t mx_exponent(uint32_t a, int64_t emax, int64_t ceil_rule, uint32_t top_mbits) {
    if (a == 0) return -127;
    uint32_t field = a >> 23, mb;
    int64_t e_floor;
    if (field) {
        e_floor = (int64_t)field - 127;
        mb = a & 0x7FFFFF;
    } else {   /* subnormal amax: normalize its significand */
        int p = 31 - __builtin_clz(a);
        e_floor = p - 149;
        mb = (a << (23 - p)) & 0x7FFFFF;
    }
    int64_t e = e_floor - emax + (ceil_rule && mb > top_mbits);
    return e < -127 ? -127 : (e > 127 ? 127 : e);
}

/* Nearest rounding of blocks of 32 along the last axis (the OCP block), one block at a
 * time in one pass: amax, scale, x * 2^-e, rounding and q * 2^e stay in registers, with no
 * tile buffers or per-tile calls.  The rounding is the kernel's formula specialised to
 * what an MX block can hold, v = x * 2^-e finite with |v| < 2^(emax + 2):
 *     d  = min(max(te - field, 0), M + 1),   sh = s0 + d          (s0 = 23 - M)
 *     sh <= 23:  q = (a + 2^(sh-1) - 1 + kept bit) & ~(2^sh - 1)   (kept bit: bit sh of
 *                a, or the implicit 1 at sh = 23)
 *     sh == 24:  v in [Q/2, Q) rounds to Q above the tie, else 0 (field below: 0)
 * then saturation at max and the sign (fnuz: no -0).  Every lane runs the same
 * instructions, with variable shifts, so the loops vectorise.  Same bits as the tile
 * path below, which serves the other roundings, blocks and axes. */
MULTIVERSION static void mx_rows_nearest32(mx_job_t *J) {
    const plan_t *pl = J->plan;
    const uint32_t s0 = (uint32_t)pl->s0, te = (uint32_t)pl->te;
    const uint32_t max_bits = (uint32_t)pl->max_bits, ovf_bits = (uint32_t)pl->ovf_bits;
    const uint32_t q_bits = (uint32_t)pl->q_bits, uz = (uint32_t)pl->unsigned_zero;
    /* 2^23 Q: float32 steps of Q above it, so (|v| + magic) - magic rounds |v| < 2^emin
     * to a multiple of Q, to nearest-even under the default rounding mode */
    const uint32_t magic_bits = q_bits + (23u << 23);
    float magic;
    memcpy(&magic, &magic_bits, 4);
    const uint32_t half_m1 = (1u << (s0 - 1)) - 1, keep = ~((1u << s0) - 1);
    const int64_t n = J->n, nb = J->n_blocks;
    uint32_t pad[32], q[32];
    int64_t o = J->row_begin / nb, b = J->row_begin % nb;
    for (int64_t r = J->row_begin; r < J->row_end; r++) {
        int64_t j_end = n - b * 32 < 32 ? n - b * 32 : 32;
        int64_t at = o * n + b * 32;
        const uint32_t *in = J->src + at;
        if (j_end < 32) {   /* the padded last block of a row */
            memcpy(pad, in, sizeof(uint32_t) * (size_t)j_end);
            memset(pad + j_end, 0, sizeof(uint32_t) * (size_t)(32 - j_end));
            in = pad;
        }
        if (++b == nb) { b = 0; o++; }
        uint32_t am = 0;
        for (int j = 0; j < 32; j++) {
            uint32_t a = in[j] & 0x7FFFFFFF;
            am = a > am ? a : am;
        }
        if (am >= 0x7F800000) {   /* NaN or inf in the block: NaN scale, NaN values */
            J->scales[r] = 0x7FC00000;
            for (int64_t j = 0; j < j_end; j++) J->deq[at + j] = 0x7FC00000;
            if (J->elems) memset(J->elems + at, 0, sizeof(uint32_t) * (size_t)j_end);
            continue;
        }
        int64_t e = mx_exponent(am, J->emax, J->ceil_rule, J->top_mbits);
        uint32_t mb = pow2_bits(-e), sb = pow2_bits(e);
        float m, s;
        memcpy(&m, &mb, 4);
        memcpy(&s, &sb, 4);
        /* one branch-free loop: blocks with and without values below the format's
         * normals alternate unpredictably (e3m2), so both results are computed and the
         * normal one taken where |v| >= 2^emin */
        for (int j = 0; j < 32; j++) {
            float vf;
            memcpy(&vf, in + j, 4);
            vf *= m;
            uint32_t v;
            memcpy(&v, &vf, 4);
            uint32_t sign = v & 0x80000000u, a = v ^ sign;
            uint32_t res = (a + half_m1 + ((a >> s0) & 1)) & keep;
            res = res > max_bits ? ovf_bits : res;
            float af;
            memcpy(&af, &a, 4);
            af = (af + magic) - magic;
            uint32_t sub;
            memcpy(&sub, &af, 4);
            res = (a >> 23) >= te ? res : sub;
            sign = (uz & (res == 0)) ? 0 : sign;
            q[j] = res | sign;
        }
        float *drow = (float *)(J->deq + at);
        if (j_end == 32) {
            for (int j = 0; j < 32; j++) {
                float qf;
                memcpy(&qf, q + j, 4);
                drow[j] = qf * s;
            }
        } else {
            for (int64_t j = 0; j < j_end; j++) {
                float qf;
                memcpy(&qf, q + j, 4);
                drow[j] = qf * s;
            }
        }
        if (J->elems) memcpy(J->elems + at, q, sizeof(uint32_t) * (size_t)j_end);
        J->scales[r] = sb;
    }
}

MULTIVERSION static void mx_rows(mx_job_t *J) {
    const plan_t *pl = J->plan;
    if (J->mode == MODE_NEAREST && J->inner == 1 && J->block == 32 && !pl->m0 &&
        pl->s0 >= 1 && pl->te > 24 - pl->s0) {
        mx_rows_nearest32(J);
        return;
    }
    const int64_t inner = J->inner, block = J->block, n = J->n;
    const int64_t kt_max = inner < MX_TILE ? inner : MX_TILE;
    /* whole rows per tile when a row's inner extent fits, else one k-range of one row */
    const int64_t rows_per = inner <= MX_TILE ? (MX_TILE / (block * inner) > 0 ?
                                                 MX_TILE / (block * inner) : 1) : 1;
    const int64_t tile_len = inner <= MX_TILE ? rows_per * block * inner : kt_max;
    uint32_t *amax = malloc(sizeof(uint32_t) * (size_t)(rows_per * kt_max));
    uint32_t *mult = malloc(sizeof(uint32_t) * (size_t)(rows_per * kt_max));
    uint32_t *scl = malloc(sizeof(uint32_t) * (size_t)(rows_per * kt_max));
    uint32_t *tmp = malloc(sizeof(uint32_t) * (size_t)tile_len);
    uint32_t *q = malloc(sizeof(uint32_t) * (size_t)tile_len);
    if (!amax || !mult || !scl || !tmp || !q) {
        J->failed = 1;
        free(amax); free(mult); free(scl); free(tmp); free(q);
        return;
    }
    const f32_loop_t round_loop = F32_LOOPS[J->mode];
    if (inner == 1) {   /* blocks along the last axis: each row is `block` contiguous values */
        for (int64_t r0 = J->row_begin; r0 < J->row_end; r0 += rows_per) {
            int64_t r1 = r0 + rows_per < J->row_end ? r0 + rows_per : J->row_end;
            /* row r = o * n_blocks + b; o and b advance with r (no division per row) */
            int64_t o0 = r0 / J->n_blocks, b0 = r0 % J->n_blocks;
            for (int64_t r = r0, o = o0, b = b0; r < r1; r++, b = b + 1 == J->n_blocks ? 0 : b + 1,
                 o = b == 0 ? o + 1 : o) {
                int64_t j_end = n - b * block < block ? n - b * block : block;
                const uint32_t *row = J->src + o * n + b * block;
                uint32_t am = 0;
                if (j_end == 32) {   /* the OCP block: a constant trip count vectorizes fully */
                    for (int64_t j = 0; j < 32; j++) {
                        uint32_t a = row[j] & 0x7FFFFFFF;
                        am = a > am ? a : am;
                    }
                } else {
                    for (int64_t j = 0; j < j_end; j++) {
                        uint32_t a = row[j] & 0x7FFFFFFF;
                        am = a > am ? a : am;
                    }
                }
                int special = am >= 0x7F800000;
                int64_t e = special ? 0 : mx_exponent(am, J->emax, J->ceil_rule, J->top_mbits);
                uint32_t mb = pow2_bits(-e), sb = special ? 0x7FC00000 : pow2_bits(e);
                float m;
                memcpy(&m, &mb, 4);
                float *dst = (float *)(tmp + (r - r0) * block);
                const float *rowf = (const float *)row;
                if (j_end == 32 && block == 32) {
                    for (int64_t j = 0; j < 32; j++) dst[j] = rowf[j] * m;
                } else {
                    for (int64_t j = 0; j < j_end; j++) dst[j] = rowf[j] * m;
                    for (int64_t j = j_end; j < block; j++) dst[j] = 0.0f;
                }
                scl[r - r0] = sb;
                J->scales[r] = sb;
            }
            int64_t len = (r1 - r0) * block;
            round_loop(tmp, q, 0, len, J->plan, J->seed, r0 * block);
            for (int64_t r = r0, o = o0, b = b0; r < r1; r++, b = b + 1 == J->n_blocks ? 0 : b + 1,
                 o = b == 0 ? o + 1 : o) {
                int64_t j_end = n - b * block < block ? n - b * block : block;
                int64_t at = o * n + b * block;
                uint32_t sb = scl[r - r0];
                const uint32_t *qrow = q + (r - r0) * block;
                if (sb == 0x7FC00000) {
                    for (int64_t j = 0; j < j_end; j++) J->deq[at + j] = sb;
                    if (J->elems) memset(J->elems + at, 0, sizeof(uint32_t) * (size_t)j_end);
                    continue;
                }
                float sf;
                memcpy(&sf, &sb, 4);
                float *drow = (float *)(J->deq + at);
                const float *qf = (const float *)qrow;
                if (j_end == 32) {
                    for (int64_t j = 0; j < 32; j++) drow[j] = qf[j] * sf;
                } else {
                    for (int64_t j = 0; j < j_end; j++) drow[j] = qf[j] * sf;
                }
                if (J->elems) memcpy(J->elems + at, qrow, sizeof(uint32_t) * (size_t)j_end);
            }
        }
        free(amax); free(mult); free(scl); free(tmp); free(q);
        return;
    }
    for (int64_t r0 = J->row_begin; r0 < J->row_end; r0 += rows_per) {
        int64_t r1 = r0 + rows_per < J->row_end ? r0 + rows_per : J->row_end;
        for (int64_t k0 = 0; k0 < inner; k0 += kt_max) {
            int64_t kt = inner - k0 < kt_max ? inner - k0 : kt_max;
            /* 1. block amax, exponent, multiplier and scale per (row, k) */
            for (int64_t r = r0; r < r1; r++) {
                int64_t o = r / J->n_blocks, b = r % J->n_blocks;
                int64_t j_end = n - b * block < block ? n - b * block : block;
                uint32_t *am = amax + (r - r0) * kt;
                for (int64_t k = 0; k < kt; k++) am[k] = 0;
                for (int64_t j = 0; j < j_end; j++) {
                    const uint32_t *row = J->src + (o * n + b * block + j) * inner + k0;
                    for (int64_t k = 0; k < kt; k++) {
                        uint32_t a = row[k] & 0x7FFFFFFF;
                        am[k] = a > am[k] ? a : am[k];
                    }
                }
                for (int64_t k = 0; k < kt; k++) {
                    int64_t i = (r - r0) * kt + k;
                    int special = am[k] >= 0x7F800000;
                    int64_t e = special ? 0 : mx_exponent(am[k], J->emax, J->ceil_rule,
                                                          J->top_mbits);
                    mult[i] = pow2_bits(-e);
                    scl[i] = special ? 0x7FC00000 : pow2_bits(e);
                }
            }
            /* 2. scale, round and write.  Whole rows (kt == inner) lie at consecutive
             * random indices and are rounded in one call; otherwise each row j of the
             * block is a separate range of kt indices. */
            int whole = kt == inner;
            for (int64_t jj = 0; jj < (whole ? 1 : block); jj++) {
                int64_t t = 0;
                for (int64_t r = r0; r < r1; r++) {
                    int64_t o = r / J->n_blocks, b = r % J->n_blocks;
                    const float *mrow = (const float *)(mult + (r - r0) * kt);
                    for (int64_t j = whole ? 0 : jj; j < (whole ? block : jj + 1); j++) {
                        int64_t pos = b * block + j;
                        float *dst = (float *)(tmp + t);
                        if (pos < n) {
                            const float *row = (const float *)(J->src + (o * n + pos) * inner + k0);
                            for (int64_t k = 0; k < kt; k++) dst[k] = row[k] * mrow[k];
                        } else {
                            for (int64_t k = 0; k < kt; k++) dst[k] = 0.0f;
                        }
                        t += kt;
                    }
                }
                int64_t idx0 = r0 * block * inner + (whole ? 0 : jj * inner + k0);
                round_loop(tmp, q, 0, t, J->plan, J->seed, idx0);
                t = 0;
                for (int64_t r = r0; r < r1; r++) {
                    int64_t o = r / J->n_blocks, b = r % J->n_blocks;
                    const uint32_t *srow = scl + (r - r0) * kt;
                    for (int64_t j = whole ? 0 : jj; j < (whole ? block : jj + 1); j++) {
                        int64_t pos = b * block + j;
                        if (pos < n) {
                            int64_t at = (o * n + pos) * inner + k0;
                            uint32_t *drow = J->deq + at;
                            const uint32_t *qrow = q + t;
                            for (int64_t k = 0; k < kt; k++) {
                                float qf, sf, pf;
                                uint32_t pb;
                                memcpy(&qf, qrow + k, 4);
                                memcpy(&sf, srow + k, 4);
                                pf = qf * sf;
                                memcpy(&pb, &pf, 4);
                                /* NaN-scaled block: the scale's NaN, whatever q holds */
                                drow[k] = srow[k] == 0x7FC00000 ? 0x7FC00000 : pb;
                            }
                            if (J->elems) {
                                uint32_t *erow = J->elems + at;
                                for (int64_t k = 0; k < kt; k++)
                                    erow[k] = srow[k] == 0x7FC00000 ? 0 : qrow[k];
                            }
                        }
                        t += kt;
                    }
                }
            }
            for (int64_t r = r0; r < r1; r++) {
                int64_t o = r / J->n_blocks, b = r % J->n_blocks;
                memcpy(J->scales + (o * J->n_blocks + b) * inner + k0,
                       scl + (r - r0) * kt, sizeof(uint32_t) * (size_t)kt);
            }
        }
    }
    free(amax); free(mult); free(scl); free(tmp); free(q);
}

static void *mx_thread(void *arg) {
    mx_rows((mx_job_t *)arg);
    return NULL;
}

PyDoc_STRVAR(mx_doc,
"mx_quantize(src, deq, scales, elems, outer, n, inner, block, emax, ceil_rule, top_mbits,\n"
"            mode, seed, nthreads, s0, te, m0, m0_adj, unsigned_zero, max_bits, q_bits,\n"
"            inf_bits, nan_bits, ovf_bits, infin_bits)\n"
"\n"
"OCP MX block quantization of contiguous float32 [outer, n, inner] along n; writes the\n"
"dequantized values, the float32 scales [outer, ceil(n / block), inner] and, when elems\n"
"is not 0, the element values q.  The plan must be a saturating float32 plan.");

static PyObject *mx_quantize(PyObject *self, PyObject *args) {
    unsigned long long src, deq, scales, elems, seed, top_mbits;
    long long outer, n, inner, block, emax, ceil_rule;
    int mode, nthreads;
    long long s0, te, m0, m0_adj, uz;
    unsigned long long max_bits, q_bits, inf_bits, nan_bits, ovf_bits, infin_bits;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLLLLLKiKiLLLLLKKKKKK", &src, &deq, &scales, &elems,
                          &outer, &n, &inner, &block, &emax, &ceil_rule, &top_mbits, &mode,
                          &seed, &nthreads, &s0, &te, &m0, &m0_adj, &uz, &max_bits, &q_bits,
                          &inf_bits, &nan_bits, &ovf_bits, &infin_bits))
        return NULL;
    if (mode < 0 || mode > 2 || s0 < 0 || s0 > 23 || te < 1 || block < 1 || outer < 0 ||
        n < 0 || inner < 0) {
        PyErr_Format(PyExc_ValueError, "mx_quantize arguments out of range: mode=%d s0=%lld "
                     "te=%lld block=%lld", mode, s0, te, block);
        return NULL;
    }
    if (outer == 0 || n == 0 || inner == 0) Py_RETURN_NONE;
    plan_t plan = {s0, te, m0, m0_adj, uz, max_bits, q_bits, inf_bits, nan_bits, ovf_bits,
                   infin_bits};
    int64_t n_blocks = (n + block - 1) / block, rows = outer * n_blocks;
    int64_t total = rows * block * inner;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((int64_t)nthreads > total / MIN_PER_THREAD) nthreads = (int)(total / MIN_PER_THREAD);
    if ((int64_t)nthreads > rows) nthreads = (int)rows;
    if (nthreads < 1) nthreads = 1;
    mx_job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t chunk = (rows + nthreads - 1) / nthreads;
    for (int t = 0; t < nthreads; t++) {
        mx_job_t j = {(const uint32_t *)(uintptr_t)src, (uint32_t *)(uintptr_t)deq,
                      (uint32_t *)(uintptr_t)scales, (uint32_t *)(uintptr_t)elems, outer, n,
                      inner, block, n_blocks, emax, ceil_rule, (uint32_t)top_mbits, &plan,
                      mode, (uint64_t)seed, 0, 0, 0};
        j.row_begin = (int64_t)t * chunk < rows ? (int64_t)t * chunk : rows;
        j.row_end = (int64_t)(t + 1) * chunk < rows ? (int64_t)(t + 1) * chunk : rows;
        jobs[t] = j;
        started[t] = 0;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&tids[t], NULL, mx_thread, &jobs[t]) == 0;
    mx_rows(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else mx_rows(&jobs[t]);
    }
    for (int t = 0; t < nthreads; t++) failed |= jobs[t].failed;
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(scaled_doc,
"scaled_round(src_ptr, lp_ptr, values_ptr, n, is_bf16, scale_bits, mode, seed, nthreads,\n"
"             s0, te, m0, m0_adj, unsigned_zero, max_bits, q_bits, inf_bits, nan_bits,\n"
"             ovf_bits, infin_bits)\n"
"\n"
"lp = round(x * s) (written when lp_ptr is not 0) and values = lp / s (written when\n"
"values_ptr is not 0) for n contiguous\n"
"float32 (is_bf16=0) or bfloat16 x, float32 results; s given by its float32 bits.");

static PyObject *scaled_round(PyObject *self, PyObject *args) {
    unsigned long long src, lp, values, seed, sbits;
    long long n;
    int is_bf16, mode, nthreads;
    long long s0, te, m0, m0_adj, uz;
    unsigned long long max_bits, q_bits, inf_bits, nan_bits, ovf_bits, infin_bits;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKLiKiKiLLLLLKKKKKK", &src, &lp, &values, &n, &is_bf16,
                          &sbits, &mode, &seed, &nthreads, &s0, &te, &m0, &m0_adj, &uz,
                          &max_bits, &q_bits, &inf_bits, &nan_bits, &ovf_bits, &infin_bits))
        return NULL;
    if (mode < 0 || mode > 2 || s0 < 0 || s0 > 23 || te < 1) {
        PyErr_Format(PyExc_ValueError, "scaled_round plan out of range: mode=%d s0=%lld "
                     "te=%lld", mode, s0, te);
        return NULL;
    }
    if (n <= 0) Py_RETURN_NONE;
    plan_t plan = {s0, te, m0, m0_adj, uz, max_bits, q_bits, inf_bits, nan_bits, ovf_bits,
                   infin_bits};
    job_t base = {(const void *)(uintptr_t)src, (void *)(uintptr_t)values, 0, n, &plan, NULL,
                  (uint64_t)seed, 0, mode, 0, JOB_SCALED, (const void *)(uintptr_t)lp,
                  ((uint64_t)(is_bf16 != 0) << 32) | (uint32_t)sbits};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(base, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(lut_doc,
"lut_decode(src_ptr, dst_ptr, n, table_ptr, nthreads)\n"
"\n"
"dst[i] = table[src[i]] for n uint8 codes and a table of 256 32-bit patterns.");

static PyObject *lut_decode(PyObject *self, PyObject *args) {
    unsigned long long src, dst, table;
    long long n;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLKi", &src, &dst, &n, &table, &nthreads)) return NULL;
    if (n <= 0) Py_RETURN_NONE;
    job_t base = {(const void *)(uintptr_t)src, (void *)(uintptr_t)dst, 0, n, NULL, NULL,
                  0, 0, 0, 0, JOB_LUT, (const void *)(uintptr_t)table, 0};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(base, n, nthreads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lut_decode", lut_decode, METH_VARARGS, lut_doc},
    {"scaled_round", scaled_round, METH_VARARGS, scaled_doc},
    {"mx_quantize", mx_quantize, METH_VARARGS, mx_doc},
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

PyMODINIT_FUNC PyInit__cquant(void) {
    PyObject *m = PyModule_Create(&module);
    /* scaled_round takes values_ptr 0 (builds without this constant write through it) */
    if (m != NULL && PyModule_AddIntConstant(m, "SCALED_ROUND_SKIPS_VALUES", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
