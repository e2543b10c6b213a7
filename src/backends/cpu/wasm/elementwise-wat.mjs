// Generates the WebAssembly text for the CPU elementwise kernels (assembled by scripts/build-wasm.mjs
// into build/wasm/elementwise.wasm): float32 transcendental kernels (exp, sigmoid, silu, softmax /
// logsumexp rows, attention probability blocks) and float32 / float64 binary arithmetic.
//
// The module imports the CPU backend's shared arena memory (src/backends/cpu/arena.ts), so kernels
// run on tensor storage in place: byte addresses in, lengths in elements. They write exactly the
// elements they are asked for (tails are finished with single-lane stores or scalar code): the
// bytes after a tensor belong to another live tensor. They may READ up to one vector past a row's
// end; the arena keeps slack after its last block so that never leaves the memory.
//
// exp, f32x4 (Cephes expf scheme):
//   x clamped to [-110, 89] (pmin/pmax with x first keep NaN; +Inf -> overflow -> +Inf, -Inf -> 0)
//   k = nearest(x · log2 e) (shifter trick),  r = x − k·ln2_hi − k·ln2_lo (+ xl, the low part of an exact difference)
//   exp(r) = 1 + r + r² · P(r), P of degree 5 (minimax on |r| <= ln2/2; total degree 7)
//   2^k applied as two exponent-bit scalings 2^(k>>1) · 2^(k − (k>>1)), so the result may go
//   subnormal (one final rounding) or overflow to +Inf without an out-of-range exponent field.

const f4 = (v) => `(v128.const f32x4 ${v} ${v} ${v} ${v})`;

/** Multiplies the f32 row [$q, $end) in place by the splat $inv: four lanes up to $vend, then the tail. Leaves $q at $end. */
const rowScale = `(block $d4 (loop $l4
      (br_if $d4 (i32.ge_u (local.get $q) (local.get $vend)))
      (v128.store (local.get $q) (f32x4.mul (v128.load (local.get $q)) (local.get $inv)))
      (local.set $q (i32.add (local.get $q) (i32.const 16)))
      (br $l4)))
    (block $d5 (loop $l5
      (br_if $d5 (i32.ge_u (local.get $q) (local.get $end)))
      (f32.store (local.get $q) (f32.mul (f32.load (local.get $q)) (f32x4.extract_lane 0 (local.get $inv))))
      (local.set $q (i32.add (local.get $q) (i32.const 4)))
      (br $l5)))`;

/**
 * The max of the f32 row [$q, $end) into local $dst: four lanes at a time up to $vend, then the tail
 * one by one (`select` on >, so NaN never wins, as in the JS loop). Uses $mv and $t; leaves $q at $end.
 */
const rowMax = (dst) => `(local.set $mv ${f4('-inf')})
    (block $d1 (loop $l1
      (br_if $d1 (i32.ge_u (local.get $q) (local.get $vend)))
      (local.set $mv (f32x4.pmax (local.get $mv) (v128.load (local.get $q))))
      (local.set $q (i32.add (local.get $q) (i32.const 16)))
      (br $l1)))
    (local.set $${dst} (f32.max
      (f32.max (f32x4.extract_lane 0 (local.get $mv)) (f32x4.extract_lane 1 (local.get $mv)))
      (f32.max (f32x4.extract_lane 2 (local.get $mv)) (f32x4.extract_lane 3 (local.get $mv)))))
    (block $d2 (loop $l2
      (br_if $d2 (i32.ge_u (local.get $q) (local.get $end)))
      (local.set $t (f32.load (local.get $q)))
      (local.set $${dst} (select (local.get $t) (local.get $${dst}) (f32.gt (local.get $t) (local.get $${dst}))))
      (local.set $q (i32.add (local.get $q) (i32.const 4)))
      (br $l2)))`;
const i4 = (v) => `(v128.const i32x4 ${v} ${v} ${v} ${v})`;

const LOG2E = '1.44269504088896341';
const LN2_HI = '0.693359375';
const LN2_LO = '-2.12194440e-4';
// k = nearest(x · log2 e) by the 1.5 · 2^23 shifter: the sum rounds to an integer whose low mantissa
// bits are k (two's complement), cheaper than nearest + trunc_sat on x86.
const SHIFTER = '12582912';
const SHIFTER_BITS = 0x4b400000;
const P = ['1.9875691500e-4', '1.3981999507e-3', '8.3334519073e-3', '4.1665795894e-2', '1.6666665459e-1', '5.0000001201e-1'];

/** Locals every exp expansion uses. */
const EXP_LOCALS = '(local $ex v128) (local $ek v128) (local $ekf v128) (local $er v128) (local $ep v128) (local $ek1 v128)';

/**
 * Instructions computing exp of the v128 in local `src` (plus the v128 in local `lo` when given: a
 * small correction added to the reduced argument) and leaving the result on the stack.
 */
function expParts(src, lo) {
  const horner = P.slice(1).reduce(
    (acc, c) => `(f32x4.add (f32x4.mul ${acc} (local.get $er)) ${f4(c)})`,
    f4(P[0]),
  );
  return `
    (local.set $ex (f32x4.pmin (f32x4.pmax (local.get ${src}) ${f4('-110')}) ${f4('89')}))
    (local.set $ekf (f32x4.add (f32x4.mul (local.get $ex) ${f4(LOG2E)}) ${f4(SHIFTER)}))
    (local.set $ek (i32x4.sub (local.get $ekf) ${i4(SHIFTER_BITS)}))
    (local.set $ekf (f32x4.sub (local.get $ekf) ${f4(SHIFTER)}))
    (local.set $er (f32x4.sub (f32x4.sub (local.get $ex) (f32x4.mul (local.get $ekf) ${f4(LN2_HI)})) (f32x4.mul (local.get $ekf) ${f4(LN2_LO)})))
    ${lo ? `(local.set $er (f32x4.add (local.get $er) (local.get ${lo})))` : ''}
    (local.set $ep ${horner})
    (local.set $ep (f32x4.add (f32x4.add (f32x4.mul (f32x4.mul (local.get $ep) (local.get $er)) (local.get $er)) (local.get $er)) ${f4('1')}))
    (local.set $ek1 (i32x4.shr_s (local.get $ek) (i32.const 1)))
    (local.set $ep (f32x4.mul (local.get $ep) (i32x4.shl (i32x4.add (local.get $ek1) ${i4(127)}) (i32.const 23))))
    (local.set $ek1 (i32x4.shl (i32x4.add (i32x4.sub (local.get $ek) (local.get $ek1)) ${i4(127)}) (i32.const 23)))`;
}

/**
 * Instructions computing exp of the v128 in local `src` (plus the v128 in local `lo` when given: a
 * small correction added to the reduced argument) and leaving the result on the stack. (expParts
 * leaves exp = $ep · $ek1 with $ep normal, so a product with exp can be rounded once.)
 */
function expOf(src, lo) {
  return `${expParts(src, lo)}
    (f32x4.mul (local.get $ep) (local.get $ek1))`;
}

/** The same instructions on a second set of locals (for the 2-way unrolled loop). */
const second = (text) => text.replace(/\$(ek1|ekf|ex|ek|er|ep|e|v)(?![\w])/g, '$$$1_2');

/** Stores lanes 0 .. rem-1 (rem < 4, an i32 expression) of the f32x4 in local `v` at `addr`. */
const storeTail = (addr, v, rem) => [0, 1, 2]
  .map((l) => `(if (i32.gt_u ${rem} (i32.const ${l})) (then (v128.store32_lane offset=${4 * l} ${l} ${addr} (local.get ${v}))))`).join('\n');

/**
 * A unary kernel dst[i] = f(src[i]), i < n (dst may be src): pairs of vectors (two independent exps
 * per iteration, for the out-of-order core to overlap: +~15% measured), then one vector, then the
 * n % 4 tail through the 16-byte scratch at $tmp so it takes the same vector code (same values).
 * `body` maps local $v to the result on the stack.
 */
function unaryKernel(name, body) {
  return `
  (func (export "${name}") (param $src i32) (param $dst i32) (param $n i32) (param $tmp i32)
    (local $end i32) (local $rem i32) (local $i i32) (local $v v128) (local $e v128) ${EXP_LOCALS} ${second(`(local $v v128) (local $e v128) ${EXP_LOCALS}`)}
    (local.set $end (i32.add (local.get $src) (i32.shl (i32.and (local.get $n) (i32.const -8)) (i32.const 2))))
    (block $done
      (loop $top
        (br_if $done (i32.ge_u (local.get $src) (local.get $end)))
        (local.set $v (v128.load (local.get $src)))
        (local.set $v_2 (v128.load offset=16 (local.get $src)))
        (v128.store (local.get $dst) ${body})
        (v128.store offset=16 (local.get $dst) ${second(body)})
        (local.set $src (i32.add (local.get $src) (i32.const 32)))
        (local.set $dst (i32.add (local.get $dst) (i32.const 32)))
        (br $top)))
    (if (i32.and (local.get $n) (i32.const 4)) (then
      (local.set $v (v128.load (local.get $src)))
      (v128.store (local.get $dst) ${body})
      (local.set $src (i32.add (local.get $src) (i32.const 16)))
      (local.set $dst (i32.add (local.get $dst) (i32.const 16)))))
    (local.set $rem (i32.and (local.get $n) (i32.const 3)))
    (if (local.get $rem) (then
      (v128.store (local.get $tmp) (v128.const i32x4 0 0 0 0))
      ${forLoopElems('$i', '$rem', '(f32.store (i32.add (local.get $tmp) (i32.shl (local.get $i) (i32.const 2))) (f32.load (i32.add (local.get $src) (i32.shl (local.get $i) (i32.const 2)))))')}
      (local.set $v (v128.load (local.get $tmp)))
      (local.set $v ${body})
      ${storeTail('(local.get $dst)', '$v', '(local.get $rem)')}))
  )`;
}

/** `for (i = 0; i < n; i++) stmt` over i32 locals. */
function forLoopElems(i, n, stmt) {
  return `(local.set ${i} (i32.const 0))
      (block $fe_end (loop $fe
        (br_if $fe_end (i32.ge_u (local.get ${i}) (local.get ${n})))
        ${stmt}
        (local.set ${i} (i32.add (local.get ${i}) (i32.const 1)))
        (br $fe)))`;
}

/**
 * Row kernel: for each of `rows` packed rows of n floats at $p, m = max (pmax / `x > m`: NaN
 * skipped, as in the JS loop; -Inf -> 0 in softmax mode as the JS kernel does), s = Σ exp(x − m)
 * accumulated in f64, with the subtraction carried exactly (two-sum) into the exp. Writes m (f32) to $maxp[row] and s (f64) to $sump[row].
 * With $softmax != 0, exp(x − m) · (1/s) is written to the same row of $dst (which may be $p).
 */
function rowKernel() {
  const twoSum = (a, b) => `
    (local.set $d (f32x4.sub (local.get ${a}) (local.get ${b})))
    (local.set $bb (f32x4.sub (local.get $d) (local.get ${a})))
    (local.set $dl (f32x4.add
      (f32x4.sub (local.get ${a}) (f32x4.sub (local.get $d) (local.get $bb)))
      (f32x4.sub (f32x4.neg (local.get ${b})) (local.get $bb))))
    ;; an infinite difference leaves a NaN error term: drop it (exp(-Inf) must stay 0)
    (local.set $dl (v128.and (local.get $dl) (f32x4.eq (local.get $dl) (local.get $dl))))`;
  // Sum of the lanes of $e that are < $cnt lanes into $acc (f64x2 pair), masking the rest.
  return `
  (func (export "rows") (param $p i32) (param $dst i32) (param $rows i32) (param $n i32) (param $maxp i32) (param $sump i32) (param $softmax i32)
    (local $row i32) (local $q i32) (local $end i32) (local $vend i32) (local $rem i32) (local $dd i32)
    (local $m f32) (local $t f32) (local $mv v128) (local $v v128) (local $e v128) (local $d v128) (local $bb v128) (local $dl v128)
    (local $acc v128) (local $s f64) (local $inv v128) (local $mask v128) ${EXP_LOCALS}
    ;; byte distance from a source element to its destination
    (local.set $dd (i32.sub (local.get $dst) (local.get $p)))
    (local.set $row (i32.const 0))
    (block $rdone
      (loop $rtop
        (br_if $rdone (i32.ge_u (local.get $row) (local.get $rows)))
        (local.set $end (i32.add (local.get $p) (i32.shl (local.get $n) (i32.const 2))))
        (local.set $vend (i32.add (local.get $p) (i32.shl (i32.and (local.get $n) (i32.const -4)) (i32.const 2))))
        (local.set $rem (i32.and (local.get $n) (i32.const 3)))
        ;; max
        (local.set $q (local.get $p))
        ${rowMax('m')}
        (if (i32.and (local.get $softmax) (f32.eq (local.get $m) (f32.const -inf))) (then (local.set $m (f32.const 0))))
        (f32.store (i32.add (local.get $maxp) (i32.shl (local.get $row) (i32.const 2))) (local.get $m))
        (local.set $mv (f32x4.splat (local.get $m)))
        ;; exp and sum; the tail vector reads past the row (or into the next row) and is masked
        (local.set $acc (v128.const f64x2 0 0))
        (local.set $q (local.get $p))
        (block $d3 (loop $l3
          (br_if $d3 (i32.ge_u (local.get $q) (local.get $end)))
          (local.set $v (v128.load (local.get $q)))
          ${twoSum('$v', '$mv')}
          (local.set $e ${expOf('$d', '$dl')})
          (if (i32.lt_u (local.get $q) (local.get $vend))
            (then
              (if (local.get $softmax) (then (v128.store (i32.add (local.get $q) (local.get $dd)) (local.get $e)))))
            (else
              ;; lanes >= rem are past the row: zeroed for the sum, never stored
              (local.set $mask (i32x4.lt_s (v128.const i32x4 0 1 2 3) (i32x4.splat (local.get $rem))))
              (local.set $e (v128.and (local.get $e) (local.get $mask)))
              (if (local.get $softmax) (then
                ${storeTail('(i32.add (local.get $q) (local.get $dd))', '$e', '(local.get $rem)')}))))
          (local.set $acc (f64x2.add (local.get $acc) (f64x2.promote_low_f32x4 (local.get $e))))
          (local.set $acc (f64x2.add (local.get $acc) (f64x2.promote_low_f32x4
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $e) (local.get $e)))))
          (local.set $q (i32.add (local.get $q) (i32.const 16)))
          (br $l3)))
        (local.set $s (f64.add (f64x2.extract_lane 0 (local.get $acc)) (f64x2.extract_lane 1 (local.get $acc))))
        (f64.store (i32.add (local.get $sump) (i32.shl (local.get $row) (i32.const 3))) (local.get $s))
        (if (local.get $softmax) (then
          (local.set $inv (f32x4.splat (f32.demote_f64 (f64.div (f64.const 1) (local.get $s)))))
          (local.set $q (i32.add (local.get $p) (local.get $dd)))
          (local.set $vend (i32.add (local.get $vend) (local.get $dd)))
          (local.set $end (i32.add (local.get $end) (local.get $dd)))
          ${rowScale}
          (local.set $end (i32.sub (local.get $end) (local.get $dd)))))
        (local.set $p (local.get $end))
        (local.set $row (i32.add (local.get $row) (i32.const 1)))
        (br $rtop)))
  )`;
}

/**
 * Attention probabilities of one block (see src/backends/cpu/attention.ts): `batch` × `m` rows of nk
 * raw scores at $p; row r's band is [lo_r, hi_r] (i32 pairs at $segp, shared by the batch). Within
 * the band, forward ($fwd = 1): mx = max·scale, e = exp(s·scale − mx), written normalised by 1/Σe,
 * with mx and Σe (f64) written to $aux[2·row], $aux[2·row + 1]; backward: e = exp(s·scale − $aux[row]).
 * The argument s·scale − c is formed in f64 and split into f32 hi + lo, so the exp sees it unrounded
 * as the JS double path does. Lanes outside the band are left as they are (the caller zeroes them).
 */
function bandKernel() {
  const splitArg = `
    (local.set $a0 (f64x2.sub (f64x2.mul (f64x2.promote_low_f32x4 (local.get $v)) (local.get $sc2)) (local.get $c2)))
    (local.set $a1 (f64x2.sub (f64x2.mul (f64x2.promote_low_f32x4
      (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $v) (local.get $v))) (local.get $sc2)) (local.get $c2)))
    (local.set $hi (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
      (f32x4.demote_f64x2_zero (local.get $a0)) (f32x4.demote_f64x2_zero (local.get $a1))))
    (local.set $lo (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
      (f32x4.demote_f64x2_zero (f64x2.sub (local.get $a0) (f64x2.promote_low_f32x4 (local.get $hi))))
      (f32x4.demote_f64x2_zero (f64x2.sub (local.get $a1) (f64x2.promote_low_f32x4
        (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $hi) (local.get $hi)))))))
    (local.set $lo (v128.and (local.get $lo) (f32x4.eq (local.get $lo) (local.get $lo))))`;
  return `
  (func (export "band") (param $p i32) (param $batch i32) (param $m i32) (param $nk i32) (param $segp i32)
      (param $scale f64) (param $aux i32) (param $fwd i32)
    (local $b i32) (local $r i32) (local $row i32) (local $q i32) (local $end i32) (local $vend i32) (local $rem i32) (local $lo_r i32) (local $start i32)
    (local $mx f32) (local $t f32) (local $c f64) (local $s f64) (local $mv v128) (local $v v128) (local $e v128) (local $mask v128)
    (local $sc2 v128) (local $c2 v128) (local $a0 v128) (local $a1 v128) (local $hi v128) (local $lo v128) (local $acc v128) (local $inv v128)
    ${EXP_LOCALS}
    (local.set $sc2 (f64x2.splat (local.get $scale)))
    (local.set $row (i32.const 0))
    (local.set $b (i32.const 0))
    (block $bdone (loop $btop
      (br_if $bdone (i32.ge_u (local.get $b) (local.get $batch)))
      (local.set $r (i32.const 0))
      (block $rdone (loop $rtop
        (br_if $rdone (i32.ge_u (local.get $r) (local.get $m)))
        (local.set $lo_r (i32.load (i32.add (local.get $segp) (i32.shl (local.get $r) (i32.const 3)))))
        (local.set $q (i32.add (local.get $p) (i32.shl (i32.add (i32.mul (local.get $row) (local.get $nk)) (local.get $lo_r)) (i32.const 2))))
        (local.set $end (i32.add (local.get $q) (i32.shl (i32.add (i32.sub
          (i32.load offset=4 (i32.add (local.get $segp) (i32.shl (local.get $r) (i32.const 3)))) (local.get $lo_r)) (i32.const 1)) (i32.const 2))))
        (local.set $start (local.get $q))
        (local.set $rem (i32.and (i32.shr_u (i32.sub (local.get $end) (local.get $q)) (i32.const 2)) (i32.const 3)))
        (local.set $vend (i32.sub (local.get $end) (i32.shl (local.get $rem) (i32.const 2))))
        (if (local.get $fwd)
          (then
            ${rowMax('mx')}
            (local.set $q (local.get $start))
            (local.set $c (f64.mul (f64.promote_f32 (local.get $mx)) (local.get $scale)))
            (f64.store (i32.add (local.get $aux) (i32.shl (local.get $row) (i32.const 4))) (local.get $c)))
          (else
            (local.set $c (f64.load (i32.add (local.get $aux) (i32.shl (local.get $row) (i32.const 3)))))))
        (local.set $c2 (f64x2.splat (local.get $c)))
        (local.set $acc (v128.const f64x2 0 0))
        (block $d3 (loop $l3
          (br_if $d3 (i32.ge_u (local.get $q) (local.get $end)))
          (local.set $v (v128.load (local.get $q)))
          ${splitArg}
          (local.set $e ${expOf('$hi', '$lo')})
          (if (i32.lt_u (local.get $q) (local.get $vend))
            (then (v128.store (local.get $q) (local.get $e)))
            (else
              (local.set $mask (i32x4.lt_s (v128.const i32x4 0 1 2 3) (i32x4.splat (local.get $rem))))
              (local.set $e (v128.and (local.get $e) (local.get $mask)))
              ${storeTail('(local.get $q)', '$e', '(local.get $rem)')}))
          (local.set $acc (f64x2.add (local.get $acc) (f64x2.promote_low_f32x4 (local.get $e))))
          (local.set $acc (f64x2.add (local.get $acc) (f64x2.promote_low_f32x4
            (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $e) (local.get $e)))))
          (local.set $q (i32.add (local.get $q) (i32.const 16)))
          (br $l3)))
        (if (local.get $fwd) (then
          (local.set $s (f64.add (f64x2.extract_lane 0 (local.get $acc)) (f64x2.extract_lane 1 (local.get $acc))))
          (f64.store offset=8 (i32.add (local.get $aux) (i32.shl (local.get $row) (i32.const 4))) (local.get $s))
          (local.set $inv (f32x4.splat (f32.demote_f64 (f64.div (f64.const 1) (local.get $s)))))
          (local.set $q (local.get $start))
          ${rowScale}))
        (local.set $row (i32.add (local.get $row) (i32.const 1)))
        (local.set $r (i32.add (local.get $r) (i32.const 1)))
        (br $rtop)))
      (local.set $b (i32.add (local.get $b) (i32.const 1)))
      (br $btop)))
  )`;
}

/** Binary ops with their f32x4 / f64x2 and scalar instructions (the same IEEE operation, so the same bits). */
export const BINARY_OPS = ['add', 'sub', 'mul', 'div', 'max', 'min'];
const BIN_TYPES = {
  f32: { S: 4, V: 'f32x4', T: 'f32' },
  f64: { S: 8, V: 'f64x2', T: 'f64' },
};
/** Vectors per iteration of the main loop: V8 neither unrolls nor drops the per-iteration stack check. */
const BIN_UNROLL = 4;

/**
 * out = a op b over `rows` rows of n elements; row r of a starts $sa bytes after row r − 1's (0:
 * the same row again), likewise b; out is contiguous. `mode` says which operands run along the row:
 * 'vv' both, 'vs' a (b is one element per row, splat), 'sv' b. Same-shape, scalar, row-broadcast
 * ([n, d] op [d]) and column-broadcast ([n, d] op [n, 1]) operands are all one of these.
 */
function binaryKernel(op, dt, mode) {
  const { S, V, T } = BIN_TYPES[dt];
  const va = mode !== 'sv';
  const vb = mode !== 'vs';
  const vec = (off) => `(v128.store offset=${off} (local.get $po) (${V}.${op}
      ${va ? `(v128.load offset=${off} (local.get $pa))` : '(local.get $xa)'}
      ${vb ? `(v128.load offset=${off} (local.get $pb))` : '(local.get $xb)'}))`;
  const sca = `(${T}.store (local.get $po) (${T}.${op}
      ${va ? `(${T}.load (local.get $pa))` : '(local.get $sa1)'}
      ${vb ? `(${T}.load (local.get $pb))` : '(local.get $sb1)'}))`;
  const step = (bytes) => [va && `(local.set $pa (i32.add (local.get $pa) (i32.const ${bytes})))`,
    vb && `(local.set $pb (i32.add (local.get $pb) (i32.const ${bytes})))`,
    `(local.set $po (i32.add (local.get $po) (i32.const ${bytes})))`].filter(Boolean).join(' ');
  const block = BIN_UNROLL * 16;
  return `
  (func (export "${op}_${dt}_${mode}") (param $a i32) (param $sa i32) (param $b i32) (param $sb i32) (param $o i32) (param $rows i32) (param $n i32)
    (local $r i32) (local $pa i32) (local $pb i32) (local $po i32) (local $end i32) (local $vend i32) (local $bend i32)
    (local $xa v128) (local $xb v128) (local $sa1 ${T}) (local $sb1 ${T})
    (local.set $po (local.get $o))
    (local.set $r (i32.const 0))
    (block $rdone (loop $rtop
      (br_if $rdone (i32.ge_u (local.get $r) (local.get $rows)))
      (local.set $pa (local.get $a))
      (local.set $pb (local.get $b))
      ${va ? '' : `(local.set $sa1 (${T}.load (local.get $a))) (local.set $xa (${V}.splat (local.get $sa1)))`}
      ${vb ? '' : `(local.set $sb1 (${T}.load (local.get $b))) (local.set $xb (${V}.splat (local.get $sb1)))`}
      (local.set $end (i32.add (local.get $po) (i32.mul (local.get $n) (i32.const ${S}))))
      (local.set $bend (i32.add (local.get $po) (i32.and (i32.mul (local.get $n) (i32.const ${S})) (i32.const ${-block}))))
      (local.set $vend (i32.add (local.get $po) (i32.and (i32.mul (local.get $n) (i32.const ${S})) (i32.const -16))))
      (block $d1 (loop $l1
        (br_if $d1 (i32.ge_u (local.get $po) (local.get $bend)))
        ${Array.from({ length: BIN_UNROLL }, (_, u) => vec(u * 16)).join('\n        ')}
        ${step(block)}
        (br $l1)))
      (block $d2 (loop $l2
        (br_if $d2 (i32.ge_u (local.get $po) (local.get $vend)))
        ${vec(0)}
        ${step(16)}
        (br $l2)))
      (block $d3 (loop $l3
        (br_if $d3 (i32.ge_u (local.get $po) (local.get $end)))
        ${sca}
        ${step(S)}
        (br $l3)))
      (local.set $a (i32.add (local.get $a) (local.get $sa)))
      (local.set $b (i32.add (local.get $b) (local.get $sb)))
      (local.set $r (i32.add (local.get $r) (i32.const 1)))
      (br $rtop)))
  )`;
}

export function generateElementwiseWat() {
  return `(module
  (import "env" "memory" (memory 1 32768 shared))
  ${unaryKernel('exp', expOf('$v'))}
  ${unaryKernel('sigmoid', `(block (result v128)
    ;; e = exp(-|x|) never overflows: 1/(1+e) for x >= 0, e/(1+e) below (keeps the tiny tail of x << 0)
    (local.set $e (f32x4.neg (f32x4.abs (local.get $v))))
    (local.set $e ${expOf('$e')})
    (f32x4.div
      (v128.bitselect (local.get $e) ${f4('1')} (f32x4.lt (local.get $v) ${f4('0')}))
      (f32x4.add ${f4('1')} (local.get $e))))`)}
  ${unaryKernel('silu', `(block (result v128)
    ;; as sigmoid; x · e is formed before the last 2^k scaling so a subnormal result rounds once
    (local.set $e (f32x4.neg (f32x4.abs (local.get $v))))
    ${expParts('$e')}
    (local.set $e (f32x4.mul (local.get $ep) (local.get $ek1)))
    (f32x4.div
      (v128.bitselect
        ;; + (t − t) with t = x · e: 0, or NaN at x = −Inf as in the JS kernel (−Inf / (1 + Inf))
        ;; (zero below the clamp of the exp argument, where e·x would not be)
        (f32x4.add (v128.and (f32x4.mul (f32x4.mul (local.get $v) (local.get $ep)) (local.get $ek1)) (f32x4.ge (local.get $v) ${f4('-110')}))
          (f32x4.sub (f32x4.mul (local.get $v) (local.get $e)) (f32x4.mul (local.get $v) (local.get $e))))
        (local.get $v) (f32x4.lt (local.get $v) ${f4('0')}))
      (f32x4.add ${f4('1')} (local.get $e))))`)}
  ${rowKernel()}
  ${bandKernel()}
  ${BINARY_OPS.flatMap((op) => ['f32', 'f64'].flatMap((dt) => ['vv', 'vs', 'sv'].map((mode) => binaryKernel(op, dt, mode)))).join('\n')}
)
`;
}
