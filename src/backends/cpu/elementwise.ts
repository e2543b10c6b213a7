/**
 * Generated elementwise loops for the CPU backend. One kernel source serves every unary, binary,
 * compare and select op; a kernel is built (with `new Function`) once per op AND per combination
 * of array types, so each generated function only ever sees one typed-array type per argument and
 * V8 keeps its element accesses monomorphic. (A shared kernel that met Float32Array, Float64Array
 * and Int32Array inputs ran its hot loop through polymorphic loads.)
 *
 * Strided kernels walk a coalesced N-d index space and pick, once per call, an inner loop for the
 * pattern of innermost strides: every input either contiguous (stride 1) or broadcast along the row
 * (stride 0, loaded once per row) — the same-shape, scalar, row- and column-broadcast cases — with
 * a generic strided loop for anything else. The values are the same on every path: each output
 * element is `expr` of the same input elements.
 */
import type { DType, HostArray } from '../../engine/dtype.js';

type Arr = HostArray;

/** `(out, shape, strides[], ...inputs)`: shape and strides already coalesced. */
export type StridedKernel = (out: Arr, shape: number[], strides: number[][], in0: Arr, in1?: Arr, in2?: Arr) => void;
export type FlatKernel = (out: Arr, x: Arr) => void;

const VARS = ['x', 'y', 'z'];

/** Every assignment of {contiguous, broadcast} to `arity` inputs, as bit masks (bit i = input i contiguous). */
function masks(arity: number): number[] {
  return Array.from({ length: 1 << arity }, (_, m) => (1 << arity) - 1 - m); // all-contiguous first
}

/** Unrolling factor of the contiguous loops: V8 does not unroll, and 4 cut the loop overhead ~40% (measured). */
const UNROLL = 4;

/**
 * `for (j = 0; j < n; j++) body(j)` unrolled by UNROLL with a remainder loop; `body(e)` is the
 * statement for element index expression e (its own block, so its consts do not clash).
 */
function unrolled(j: string, n: string, body: (e: string) => string): string {
  const steps = Array.from({ length: UNROLL }, (_, u) => `{ ${body(u === 0 ? j : `${j} + ${u}`)} }`).join(' ');
  return `let ${j} = 0;
      for (const ${j}End = ${n} - ${UNROLL - 1}; ${j} < ${j}End; ${j} += ${UNROLL}) { ${steps} }
      for (; ${j} < ${n}; ${j}++) { ${body(j)} }`;
}

/**
 * Source of a strided kernel. Without `fastPaths` it is the plain N-d walker: the reference the
 * fast paths are tested against.
 */
function stridedSource(arity: number, expr: string, fastPaths: boolean): string {
  const I = [...Array(arity).keys()];
  const v = (i: number) => VARS[i];
  const cond = (m: number) => I.map((i) => `s${i} === ${(m >> i) & 1}`).join(' && ');
  // Broadcast inputs (bit clear in m) are loaded once, before the loop.
  const hoisted = (m: number, base: (i: number) => string) => I.filter((i) => !((m >> i) & 1)).map((i) => `const ${v(i)} = in${i}[${base(i)}];`).join(' ');
  const loads = (m: number, at: (i: number) => string) => I.filter((i) => (m >> i) & 1).map((i) => `const ${v(i)} = in${i}[${at(i)}];`).join(' ');
  const flat1d = fastPaths
    ? `if (r === 1) {
      ${masks(arity).map((m) => `if (${cond(m)}) { ${hoisted(m, () => '0')} ${unrolled('i', 'n', (e) => `${loads(m, () => e)} out[${e}] = ${expr};`)} return; }`).join('\n      ')}
    }`
    : '';
  const modeCalc = fastPaths
    ? `let mode = 0; ${I.map((i) => `if (s${i} === 1) mode |= ${1 << i}; else if (s${i} !== 0) mode = -1;`).join(' ')}`
    : 'const mode = -1;';
  const rowVariants = fastPaths
    ? masks(arity).map((m) => `if (mode === ${m}) { ${hoisted(m, (i) => `b${i}`)} ${unrolled('j', 'n', (e) => `${loads(m, (i) => `b${i} + ${e}`)} out[o + ${e}] = ${expr};`)} } else `).join('')
    : '';
  return `
    const r = shape.length;
    if (r === 0) { ${I.map((i) => `const ${v(i)} = in${i}[0];`).join(' ')} out[0] = ${expr}; return; }
    const n = shape[r - 1];
    ${I.map((i) => `const s${i} = strides[${i}][r - 1];`).join(' ')}
    ${flat1d}
    ${modeCalc}
    const idx = new Array(r - 1).fill(0);
    let rows = 1; for (let d = 0; d < r - 1; d++) rows *= shape[d];
    let o = 0;
    ${I.map((i) => `let b${i} = 0;`).join(' ')}
    for (let row = 0; row < rows; row++) {
      ${rowVariants}{
        ${I.map((i) => `let p${i} = b${i};`).join(' ')}
        for (let j = 0; j < n; j++) {
          ${I.map((i) => `const ${v(i)} = in${i}[p${i}]; p${i} += s${i};`).join(' ')}
          out[o + j] = ${expr};
        }
      }
      o += n;
      for (let d = r - 2; d >= 0; d--) {
        ${I.map((i) => `b${i} += strides[${i}][d];`).join(' ')}
        if (++idx[d] < shape[d]) break;
        ${I.map((i) => `b${i} -= strides[${i}][d] * shape[d];`).join(' ')}
        idx[d] = 0;
      }
    }`;
}

/**
 * `types` names the array types the kernel will see; it goes into the function's name (profiles)
 * and its source text, so V8 never shares one compiled function or its type feedback between
 * kernels of different types.
 */
export function makeStridedKernel(arity: number, expr: string, name: string, types: string, fastPaths = true): StridedKernel {
  const fn = `${name}_${types}`.replace(/\W/g, '_');
  const args = ['out', 'shape', 'strides', ...VARS.slice(0, arity).map((_, i) => `in${i}`)].join(', ');
  return new Function(`return function ${fn}(${args}) { /* ${types} */ ${stridedSource(arity, expr, fastPaths)} }`)() as StridedKernel;
}

export function makeFlatKernel(expr: string, name: string, types: string): FlatKernel {
  const fn = `${name}_${types}`.replace(/\W/g, '_');
  const body = unrolled('i', 'n', (e) => `const x = a[${e}]; out[${e}] = ${expr};`);
  return new Function(`return function ${fn}(out, a) { /* ${types} */ const n = out.length; ${body} }`)() as FlatKernel;
}

/** Short tags for kernel keys and names (bf16 travels as float32 on the CPU). */
export const TYPE_TAG: Record<DType, string> = { float32: 'f32', bfloat16: 'f32', float64: 'f64', int32: 'i32', bool: 'u8' };
