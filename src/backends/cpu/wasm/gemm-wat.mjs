// Generates the WebAssembly text for the CPU GEMM kernels (assembled by scripts/build-wasm.mjs).
//
// The structure follows the BLIS/Goto scheme: B is packed into KC x NR panels, A into MR x KC panels,
// and a register-blocked MR x NR micro-kernel runs over the packed data so that the inner loop does
// only aligned sequential loads. The micro-kernel is unrolled here (in JS) rather than written out by
// hand because it is MR*NRV copies of the same two instructions, and f32/f64 share every line of it.
//
// All pointers are byte addresses into the (shared, imported) memory; strides passed to gemm_* are in
// elements so the JS side never has to know the element size of the packed layout.

/**
 * Tile and blocking parameters per element type, measured on a Zen 5 core (V8 11.3, Node 20).
 * What decides it is TurboFan's register allocation, not the FMA count: x64 code gets 15 xmm
 * registers (xmm15 is V8's scratch), an FMA's result lands in a fresh register (its inputs stay live
 * to the end of the instruction), and the loads of an unrolled k step are issued ahead of their
 * uses. Every tile with more than 8-9 accumulators, and every tile with the k loop unrolled (U > 1),
 * spilled accumulators to the stack in the inner loop (seen with --print-wasm-code) and ran at 25-45
 * GFLOP/s; 4x8 (f32) and 4x4 (f64) with U = 1 keep everything in registers: f32 60 GFLOP/s at 512^3
 * and 1024^3 (was 41-45 with 4x16, U 2), 3x12 and 2x16 within noise of 4x8; f64 29 (was 14-22).
 * KC, MC and NC made no difference beyond the ~5% run-to-run noise. What TurboFan makes of the 4x8 relaxed
 * loop (`node --experimental-wasm-relaxed-simd --no-liftoff --print-wasm-code`, Node 20.20): 2 B loads, 4
 * broadcasts, 8 vfmadd231ps accumulating in place, 2 zero-extending index moves, 3 pointer and counter updates
 * and V8's stack check per iteration: ~21 instructions per 8 FMAs, 86-88% of the FMA peak at 512^3-1024^3.
 */
export const DEFAULT_CONFIG = {
  f32: { MR: 4, NRV: 2, KC: 256, MC: 64, NC: 2048, U: 1 },
  f64: { MR: 4, NRV: 2, KC: 256, MC: 64, NC: 1024, U: 1 },
};

const TYPES = {
  f32: { S: 4, L: 4, V: 'f32x4', T: 'f32', splat: 'v128.load32_splat' },
  f64: { S: 8, L: 2, V: 'f64x2', T: 'f64', splat: 'v128.load64_splat' },
};

const align64 = (x) => Math.ceil(x / 64) * 64;

/** Bytes of per-thread scratch each dtype needs: packed A block, packed B panel, edge-tile buffer. */
function scratchLayout(dt, cfg) {
  const { S, L } = TYPES[dt];
  const { MR, NRV, KC, MC, NC } = cfg;
  const NR = NRV * L;
  const apBytes = align64(MC * KC * S);
  const bpBytes = align64(KC * NC * S);
  const tmpBytes = align64(MR * NR * S);
  return { apBytes, bpBytes, tmpBytes, total: apBytes + bpBytes + tmpBytes };
}

export function workspaceBytes(config = DEFAULT_CONFIG) {
  return Math.max(scratchLayout('f32', config.f32).total, scratchLayout('f64', config.f64).total);
}

const get = (v) => `(local.get $${v})`;
const set = (v, e) => `(local.set $${v} ${e})`;
const i32 = (n) => `(i32.const ${n})`;
const add = (a, b) => `(i32.add ${a} ${b})`;
const mul = (a, b) => `(i32.mul ${a} ${b})`;
const min = (a, b) => `(select ${a} ${b} (i32.lt_u ${a} ${b}))`;
const locals = (names, type) => names.map((n) => `(local $${n} ${type})`).join(' ');

/** `for (v = start; v < end; v += step) body` with unsigned compare. */
function forLoop(label, v, start, end, step, body) {
  return `${set(v, start)}
    (block $${label}_end (loop $${label}
      (br_if $${label}_end (i32.ge_u ${get(v)} ${end}))
      ${body}
      ${set(v, add(get(v), step))}
      (br $${label})))`;
}

/** a · b + c: fused (relaxed_madd) in the relaxed build, else a multiply and an add. */
const madd = (V, relaxed, a, b, c) => (relaxed ? `(${V}.relaxed_madd ${a} ${b} ${c})` : `(${V}.add ${c} (${V}.mul ${a} ${b}))`);

function microKernel(dt, cfg, relaxed) {
  const { S, L, V, T, splat } = TYPES[dt];
  const { MR, NRV, U } = cfg;
  const NR = NRV * L;
  const acc = (r, v) => `c${r}_${v}`;
  const accNames = [];
  for (let r = 0; r < MR; r++) for (let v = 0; v < NRV; v++) accNames.push(acc(r, v));
  const bNames = Array.from({ length: NRV }, (_, v) => `b${v}`);

  const fma = (a, b, c) => madd(V, relaxed, a, b, c);
  const step = (kOff) => {
    const oA = kOff * MR * S;
    const oB = kOff * NR * S;
    let s = '';
    for (let v = 0; v < NRV; v++) s += set(`b${v}`, `(v128.load offset=${oB + v * 16} ${get('bp')})`) + '\n';
    for (let r = 0; r < MR; r++) {
      s += set('av', `(${splat} offset=${oA + r * S} ${get('ap')})`) + '\n';
      for (let v = 0; v < NRV; v++) s += set(acc(r, v), fma(get('av'), get(`b${v}`), get(acc(r, v)))) + '\n';
    }
    return s;
  };
  const advance = (steps) =>
    `${set('ap', add(get('ap'), i32(steps * MR * S)))} ${set('bp', add(get('bp'), i32(steps * NR * S)))}
     ${set('kc', `(i32.sub ${get('kc')} ${i32(steps)})`)}`;

  let unrolled = '';
  for (let u = 0; u < U; u++) unrolled += step(u);

  // Full tiles go straight to C; ragged edge tiles are spilled to tmp and copied element-wise so the
  // hot path has no per-element bounds checks.
  let fullStore = '';
  let fullAcc = '';
  let spill = '';
  for (let r = 0; r < MR; r++) {
    for (let v = 0; v < NRV; v++) {
      fullStore += `(v128.store offset=${v * 16} ${get('cp')} ${get(acc(r, v))})\n`;
      fullAcc += `(v128.store offset=${v * 16} ${get('cp')} (${V}.add (v128.load offset=${v * 16} ${get('cp')}) ${get(acc(r, v))}))\n`;
      spill += `(v128.store offset=${(r * NR + v * L) * S} ${get('tmp')} ${get(acc(r, v))})\n`;
    }
    const next = set('cp', add(get('cp'), get('ldc'))) + '\n';
    fullStore += next;
    fullAcc += next;
  }
  const elem = `(${T}.load ${add(get('tmp'), mul(add(mul(get('i'), i32(NR)), get('j')), i32(S)))})`;
  const dst = add(get('cp'), mul(get('j'), i32(S)));

  return `
  (func $kernel_${dt} (param $kc i32) (param $ap i32) (param $bp i32) (param $c i32) (param $ldc i32)
      (param $mr i32) (param $nr i32) (param $acc i32) (param $tmp i32)
    ${locals(accNames, 'v128')} ${locals(bNames, 'v128')} (local $av v128) (local $cp i32) (local $i i32) (local $j i32)
    (block $ku_end (loop $ku
      (br_if $ku_end (i32.lt_u ${get('kc')} ${i32(U)}))
      ${unrolled}
      ${advance(U)}
      (br $ku)))
    (block $k1_end (loop $k1
      (br_if $k1_end (i32.eqz ${get('kc')}))
      ${step(0)}
      ${advance(1)}
      (br $k1)))
    ${set('cp', get('c'))}
    (if (i32.and (i32.eq ${get('mr')} ${i32(MR)}) (i32.eq ${get('nr')} ${i32(NR)}))
      (then (if ${get('acc')} (then ${fullAcc}) (else ${fullStore})))
      (else
        ${spill}
        ${forLoop('ei', 'i', i32(0), get('mr'), i32(1), `
          ${forLoop('ej', 'j', i32(0), get('nr'), i32(1), `
            (if ${get('acc')}
              (then (${T}.store ${dst} (${T}.add (${T}.load ${dst}) ${elem})))
              (else (${T}.store ${dst} ${elem})))`)}
          ${set('cp', add(get('cp'), get('ldc')))}`)}))
  )`;
}

/**
 * Packs `len` rows (stride sP bytes) x kc columns (stride sK bytes) into panels of W rows, each panel
 * stored k-major ([kc][W]) and zero-padded to W. Used for A (rows = m) and for B (rows = n).
 */
function packer(dt, W) {
  const { S, V, T } = TYPES[dt];
  const rowBytes = W * S;
  const contiguous = rowBytes % 16 === 0
    ? Array.from({ length: rowBytes / 16 }, (_, v) =>
        `(v128.store offset=${v * 16} ${get('d')} (v128.load offset=${v * 16} ${get('s')}))`).join('\n')
    : Array.from({ length: W }, (_, r) =>
        `(${T}.store offset=${r * S} ${get('d')} (${T}.load offset=${r * S} ${get('s')}))`).join('\n');
  let strided = set('q', get('s')) + '\n';
  for (let r = 0; r < W; r++) {
    strided += `(${T}.store offset=${r * S} ${get('d')} (${T}.load ${get('q')}))\n`;
    if (r < W - 1) strided += set('q', add(get('q'), get('sP'))) + '\n';
  }
  let zero = '';
  let off = 0;
  for (; off + 16 <= rowBytes; off += 16) zero += `(v128.store offset=${off} ${get('d')} (v128.const i64x2 0 0))\n`;
  // Widths like MR=6 (24 bytes of f32) are not a multiple of 16: finish with scalars so the padding
  // never writes past the end of the packed buffer.
  for (; off < rowBytes; off += S) zero += `(${T}.store offset=${off} ${get('d')} (${T}.const 0))\n`;
  const kLoop = (body) => `
      ${set('s', get('src'))}
      ${forLoop('pk', 'p', i32(0), get('kc'), i32(1), `${body}
        ${set('s', add(get('s'), get('sK')))}
        ${set('d', add(get('d'), i32(rowBytes)))}`)}`;
  return `
  (func $pack_${dt}_${W} (param $dst i32) (param $src i32) (param $len i32) (param $kc i32) (param $sP i32) (param $sK i32)
    (local $i0 i32) (local $p i32) (local $r i32) (local $rem i32) (local $s i32) (local $d i32) (local $q i32)
    ${set('d', get('dst'))}
    ${forLoop('panel', 'i0', i32(0), get('len'), i32(W), `
      ${set('rem', `(i32.sub ${get('len')} ${get('i0')})`)}
      (if (i32.ge_u ${get('rem')} ${i32(W)})
        (then
          (if (i32.eq ${get('sP')} ${i32(S)})
            (then ${kLoop(contiguous)})
            (else ${kLoop(strided)})))
        (else ${kLoop(`${zero}
          ${set('q', get('s'))}
          ${forLoop('pr', 'r', i32(0), get('rem'), i32(1), `
            (${T}.store ${add(get('d'), mul(get('r'), i32(S)))} (${T}.load ${get('q')}))
            ${set('q', add(get('q'), get('sP')))}`)}`)}))
      ${set('src', add(get('src'), mul(get('sP'), i32(W))))}`)}
  )`;
}

function driver(dt, cfg) {
  const { S, L } = TYPES[dt];
  const { MR, NRV, KC, MC, NC } = cfg;
  const NR = NRV * L;
  const lay = scratchLayout(dt, cfg);
  // Loop order jc -> pc -> ic -> jr -> ir: the packed B panel (KC x NC) stays in L2/L3, the A block
  // (MC x KC) in L2, and one KC x NR sliver of B in L1 while the micro-kernel sweeps the A block.
  return `
  (func $gemm_${dt} (export "gemm_${dt}")
      (param $m i32) (param $n i32) (param $k i32)
      (param $a i32) (param $rsa i32) (param $csa i32)
      (param $b i32) (param $rsb i32) (param $csb i32)
      (param $c i32) (param $ldc i32) (param $ws i32)
    (local $jc i32) (local $pc i32) (local $ic i32) (local $jr i32) (local $ir i32)
    (local $nc i32) (local $kc i32) (local $mc i32) (local $Ap i32) (local $Bp i32) (local $tmp i32)
    ${set('rsa', mul(get('rsa'), i32(S)))} ${set('csa', mul(get('csa'), i32(S)))}
    ${set('rsb', mul(get('rsb'), i32(S)))} ${set('csb', mul(get('csb'), i32(S)))}
    ${set('ldc', mul(get('ldc'), i32(S)))}
    ${set('Ap', get('ws'))}
    ${set('Bp', add(get('ws'), i32(lay.apBytes)))}
    ${set('tmp', add(get('ws'), i32(lay.apBytes + lay.bpBytes)))}
    ${forLoop('jc', 'jc', i32(0), get('n'), i32(NC), `
      ${set('nc', min(i32(NC), `(i32.sub ${get('n')} ${get('jc')})`))}
      ${forLoop('pc', 'pc', i32(0), get('k'), i32(KC), `
        ${set('kc', min(i32(KC), `(i32.sub ${get('k')} ${get('pc')})`))}
        (call $pack_${dt}_${NR} ${get('Bp')}
          ${add(get('b'), add(mul(get('pc'), get('rsb')), mul(get('jc'), get('csb'))))}
          ${get('nc')} ${get('kc')} ${get('csb')} ${get('rsb')})
        ${forLoop('ic', 'ic', i32(0), get('m'), i32(MC), `
          ${set('mc', min(i32(MC), `(i32.sub ${get('m')} ${get('ic')})`))}
          (call $pack_${dt}_${MR} ${get('Ap')}
            ${add(get('a'), add(mul(get('ic'), get('rsa')), mul(get('pc'), get('csa'))))}
            ${get('mc')} ${get('kc')} ${get('rsa')} ${get('csa')})
          ${forLoop('jr', 'jr', i32(0), get('nc'), i32(NR), `
            ${forLoop('ir', 'ir', i32(0), get('mc'), i32(MR), `
              (call $kernel_${dt} ${get('kc')}
                ${add(get('Ap'), mul(mul(get('ir'), get('kc')), i32(S)))}
                ${add(get('Bp'), mul(mul(get('jr'), get('kc')), i32(S)))}
                ${add(get('c'), add(mul(add(get('ic'), get('ir')), get('ldc')), mul(add(get('jc'), get('jr')), i32(S))))}
                ${get('ldc')}
                ${min(i32(MR), `(i32.sub ${get('mc')} ${get('ir')})`)}
                ${min(i32(NR), `(i32.sub ${get('nc')} ${get('jr')})`)}
                (i32.ne ${get('pc')} (i32.const 0))
                ${get('tmp')})`)}`)}`)}`)}`)}
  )`;
}

/**
 * @param {{ relaxed?: boolean, config?: typeof DEFAULT_CONFIG }} [opts]
 * @returns {string} WAT source of a module importing `env.memory` (shared) and exporting
 *   gemm_f32, gemm_f64, workspace_bytes and the tile sizes mr_f32, nr_f32, mr_f64, nr_f64.
 */
export function generateWat({ relaxed = false, config = DEFAULT_CONFIG } = {}) {
  const parts = [];
  for (const dt of /** @type {const} */ (['f32', 'f64'])) {
    const cfg = config[dt];
    const NR = cfg.NRV * TYPES[dt].L;
    // The host splits work between threads on tile boundaries so no two threads share a C tile.
    parts.push(`(global (export "mr_${dt}") i32 ${i32(cfg.MR)}) (global (export "nr_${dt}") i32 ${i32(NR)})`);
    if (cfg.MC % cfg.MR !== 0 || cfg.NC % NR !== 0) throw new Error(`${dt}: MC/NC must be multiples of MR/NR`);
    parts.push(microKernel(dt, cfg, relaxed), packer(dt, cfg.MR));
    if (NR !== cfg.MR) parts.push(packer(dt, NR));
    parts.push(driver(dt, cfg));
  }
  return `(module
  (import "env" "memory" (memory 1 32768 shared))
  (func (export "workspace_bytes") (result i32) ${i32(workspaceBytes(config))})
  ${parts.join('\n')}
)`;
}

/**
 * A micro-benchmark module (bench/cpu-matmul.ts): `peak_<acc>(iters)` runs `acc` independent f32x4
 * multiply-add chains per iteration on values held in registers, no memory traffic: the practical
 * ceiling of any 128-bit wasm kernel here. Each chain is acc = acc · x + y, so no product is loop
 * invariant (a hoistable x · y would measure adds only); the sum is returned so nothing is dead.
 * Several chain counts, because too few leave the FMA latency exposed and too many spill.
 * @param {{ relaxed?: boolean, counts?: number[] }} [opts]
 */
export function generatePeakWat({ relaxed = false, counts = [8, 10, 12, 14] } = {}) {
  const fn = (acc) => {
    const names = Array.from({ length: acc }, (_, i) => `a${i}`);
    const init = names.map((n, i) => set(n, `(f32x4.splat (f32.const ${i + 1}))`)).join(' ');
    const body = names.map((n) => set(n, madd('f32x4', relaxed, get(n), get('x'), get('y')))).join('\n');
    const sum = names.slice(1).reduce((s, n) => `(f32x4.add ${s} ${get(n)})`, get(names[0]));
    return `
  (func (export "peak_${acc}") (param $n i32) (result f32) ${locals(names, 'v128')} (local $x v128) (local $y v128)
    ${set('x', '(f32x4.splat (f32.const 0.999))')} ${set('y', '(f32x4.splat (f32.const 0.001))')}
    ${init}
    (loop $l
      ${body}
      ${set('n', '(i32.sub (local.get $n) (i32.const 1))')}
      (br_if $l (local.get $n)))
    (f32x4.extract_lane 0 ${sum}))`;
  };
  return `(module ${counts.map(fn).join('\n')}
)`;
}
