// The number grammar of docs/CONTRACT.md §2b in the closed form every backend shares
// (sveb_kernels/numca/vocab.py defines the byte classes, the two automata and the vocab table;
// reference.py, triton.py and the compiled kernels apply them): a forward automaton (what the text so
// far means for a digit that follows) and a backward one (what the text from here on means for a digit
// before it), and the decimal-to-double conversion and FNV-1a key of one number. Kept in sync with
// vocab.py by tests/test_numca_spans.py, which runs every backend against the regex oracle.
//
// One source for both compiled backends: the cpp CPU backend (csrc/cpu/numca_cpu.cpp, plain g++) and
// the CUDA numeric_spans kernel (numca_kernel.cuh, device code under nvcc, and host code again when
// tests/cuda_emulation/ compiles the kernel with g++ and its own empty __device__). So everything here
// is pure (no memory but its arguments) and SVEB_HOST_DEVICE: __host__ __device__ under nvcc, nothing
// otherwise.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SVEB_HOST_DEVICE __host__ __device__
// The device code this replaced was __forceinline__; keep it so the kernel's registers do not change.
#define SVEB_FORCEINLINE __forceinline__
#else
#define SVEB_HOST_DEVICE
#define SVEB_FORCEINLINE inline
#endif

namespace sveb {
namespace grammar {

// Table layout and classes: sveb_kernels/numca/vocab.py.
constexpr int kColFwd = 0, kColMeta = 1, kColClasses = 2;
constexpr int kMetaLenShift = 24, kMetaDigitShift = 40;
constexpr int64_t kMetaLenMask = 0xFFFF;
constexpr int kClassesPerWord = 16;
constexpr int kComma = 10, kDot = 11, kMinus = 12, kWord = 13, kOther = 14, kEnd = 15;

// Forward automaton states (vocab.py FWD_*).
constexpr int kO = 0, kOC = 1, kW = 2, kDA = 3, kMS = 4, kA1 = 5, kA2 = 6, kA3 = 7, kA4 = 8, kF = 9, kI = 10;
// Backward automaton states (vocab.py BWD_*).
constexpr int kN = 0, kD1 = 1, kD3 = 3, kD4 = 4, kG = 5, kFR = 6;

SVEB_HOST_DEVICE SVEB_FORCEINLINE int forward_step(int s, int c) {
  if (c == kEnd) return s;
  if (c < 10) {
    switch (s) {
      case kO: case kOC: case kMS: return kA1;
      case kW: case kI: return kI;
      case kDA: case kF: return kF;
      case kA1: return kA2;
      case kA2: return kA3;
      default: return kA4;  // kA3, kA4
    }
  }
  if (c == kComma) return (s >= kA1 && s <= kA3) ? kOC : kO;
  if (c == kDot) return (s >= kA1 && s <= kA4) ? kDA : kW;
  if (c == kMinus) return (s == kO || s == kOC || s == kMS) ? kMS : kO;
  if (c == kWord) return kW;
  return kO;
}

SVEB_HOST_DEVICE SVEB_FORCEINLINE int backward_step(int s, int c) {
  if (c == kEnd) return s;
  if (c < 10) return (s >= kD1 && s <= kD4) ? (s == kD4 ? kD4 : s + 1) : kD1;
  if (c == kComma) return s == kD3 ? kG : kN;
  if (c == kDot) return (s >= kD1 && s <= kD4) ? kFR : kN;
  return kN;
}

SVEB_HOST_DEVICE SVEB_FORCEINLINE bool is_digit_run(int backward_state) {
  return backward_state >= kD1 && backward_state <= kD4;
}

// A whole token's forward transition, precomputed in the vocab table (4 bits a state).
SVEB_HOST_DEVICE SVEB_FORCEINLINE int token_forward(int64_t fwd_column, int s) {
  return static_cast<int>((fwd_column >> (4 * s)) & 15);
}

// ---- decimal to double ---------------------------------------------------------------------------
struct DoubleDouble {
  double hi, lo;
};

// std::fma is host code; CUDA's device fma is the global one. Both are the one correctly rounded a * b + c.
SVEB_HOST_DEVICE SVEB_FORCEINLINE double fused_multiply_add(double a, double b, double c) {
#ifdef __CUDA_ARCH__
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SVEB_HOST_DEVICE SVEB_FORCEINLINE DoubleDouble dd_mul(DoubleDouble a, DoubleDouble b) {
  const double p = a.hi * b.hi;
  double e = fused_multiply_add(a.hi, b.hi, -p);  // a.hi * b.hi - p exactly
  e += a.hi * b.lo + a.lo * b.hi;
  const double s = p + e;
  return {s, e - (s - p)};
}

SVEB_HOST_DEVICE SVEB_FORCEINLINE DoubleDouble dd_div(DoubleDouble a, DoubleDouble b) {
  const double q1 = a.hi / b.hi;
  const double p = q1 * b.hi;
  const double pe = fused_multiply_add(q1, b.hi, -p);
  const double r = ((a.hi - p) - pe) + a.lo - q1 * b.lo;  // a - q1 * b
  const double q2 = r / b.hi;
  const double s = q1 + q2;
  return {s, q2 - (s - q1)};
}

SVEB_HOST_DEVICE SVEB_FORCEINLINE double pow10_exact(int k) {  // 10^k, 0 <= k <= 22: every step exact
  double p = 1.0;
  for (int i = 0; i < k; ++i) p *= 10.0;
  return p;
}

// 10^k for 0 <= k <= 308 as a double-double (relative error ~2^-100): 10^(k mod 22) * (10^22)^(k / 22).
SVEB_HOST_DEVICE inline DoubleDouble pow10_dd(int k) {
  DoubleDouble acc{pow10_exact(k % 22), 0.0};
  DoubleDouble base{1e22, 0.0};
  for (int q = k / 22; q > 0; q >>= 1) {
    if (q & 1) acc = dd_mul(acc, base);
    if (q > 1) base = dd_mul(base, base);
  }
  return acc;
}

// m * 10^e for 1 <= m < 10^19: one correctly rounded operation when nothing was cut (m <= 2^53,
// |e| <= 22), as in the reference; otherwise double-doubles, within 1 ulp (the contract's bound).
SVEB_HOST_DEVICE inline double decimal_to_double(uint64_t m, int64_t e) {
  if (m <= (1ull << 53) && e >= -22 && e <= 22) {
    const double mf = static_cast<double>(m);
    return e >= 0 ? mf * pow10_exact(static_cast<int>(e)) : mf / pow10_exact(static_cast<int>(-e));
  }
  if (e > 308) return INFINITY;  // >= 10^309
  if (e < -343) return 0.0;      // < 10^19 * 10^-344, below half the smallest subnormal
  const double hi = static_cast<double>(m);
  DoubleDouble x{hi, static_cast<double>(static_cast<int64_t>(m - static_cast<uint64_t>(hi)))};
  if (e >= 0) {
    // One rounding of the double-double product; fma never overflows in between, so a product just
    // under DBL_MAX stays finite and a larger one becomes inf.
    const DoubleDouble p = pow10_dd(static_cast<int>(e));
    return fused_multiply_add(x.hi, p.hi, x.hi * p.lo + x.lo * p.hi);
  }
  int k = static_cast<int>(-e);
  if (k > 300) {  // 10^k would not be a normal double: divide in two steps
    x = dd_div(x, pow10_dd(300));
    k -= 300;
  }
  return dd_div(x, pow10_dd(k)).hi;
}

// ---- one number, accumulated class by class: canonical FNV-1a hash and value ---------------------
constexpr int kMaxDigits = 19;  // significant digits kept in a uint64 mantissa (10^19 - 1 < 2^64)
constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001B3ull;

struct NumberBuilder {
  uint64_t hash, hash_signed;  // FNV-1a of the canonical form so far, without and with a leading '-'
  uint64_t mantissa;
  int64_t exponent;
  int64_t pending_zeros;  // fraction zeros not yet known to be inside the canonical form
  int kept;               // digits in mantissa
  bool negative, in_fraction, int_nonzero, fraction_nonzero;
  int64_t start_token;

  SVEB_HOST_DEVICE void begin(int64_t token, bool sign) {
    hash = kFnvOffset;
    hash_signed = (kFnvOffset ^ static_cast<uint64_t>('-')) * kFnvPrime;
    mantissa = 0;
    exponent = 0;
    pending_zeros = 0;
    kept = 0;
    negative = sign;
    in_fraction = int_nonzero = fraction_nonzero = false;
    start_token = token;
  }
  SVEB_HOST_DEVICE void put(int ch) {
    hash = (hash ^ static_cast<uint64_t>(ch)) * kFnvPrime;
    hash_signed = (hash_signed ^ static_cast<uint64_t>(ch)) * kFnvPrime;
  }
  SVEB_HOST_DEVICE void integer_digit(int d) {
    if (d == 0 && !int_nonzero) return;  // a leading zero
    int_nonzero = true;
    put('0' + d);
    if (kept < kMaxDigits) {
      mantissa = mantissa * 10 + static_cast<uint64_t>(d);
      ++kept;
    } else {
      ++exponent;  // a dropped integer digit
    }
  }
  SVEB_HOST_DEVICE void fraction_mantissa(int d) {
    if (mantissa == 0 && d == 0) {
      --exponent;  // a zero before the first significant digit: 0.00d
    } else if (kept < kMaxDigits) {
      mantissa = mantissa * 10 + static_cast<uint64_t>(d);
      ++kept;
      --exponent;
    }
  }
  SVEB_HOST_DEVICE void fraction_digit(int d) {
    if (d == 0) {
      ++pending_zeros;
      return;
    }
    if (!fraction_nonzero) {
      if (!int_nonzero) put('0');
      put('.');
      fraction_nonzero = true;
    }
    for (; pending_zeros > 0; --pending_zeros) {
      put('0');
      fraction_mantissa(0);
    }
    put('0' + d);
    fraction_mantissa(d);
  }
  SVEB_HOST_DEVICE void add(int c) {
    if (c < 10) {
      if (in_fraction) {
        fraction_digit(c);
      } else {
        integer_digit(c);
      }
    } else if (c == kDot) {
      in_fraction = true;
    }  // ',' and the '-' that began the number add nothing more
  }
  // key (0 -> 1) and value of the finished number
  SVEB_HOST_DEVICE void finish(int64_t& key, double& value) {
    const bool zero = !int_nonzero && !fraction_nonzero;
    if (zero) {
      put('0');  // the canonical "0", never signed
      key = static_cast<int64_t>(hash);
      value = 0.0;
    } else {
      key = static_cast<int64_t>(negative ? hash_signed : hash);
      const double v = decimal_to_double(mantissa, exponent);
      value = negative ? -v : v;
    }
    if (key == 0) key = 1;
  }
};

}  // namespace grammar
}  // namespace sveb
