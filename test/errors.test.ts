/** Error messages: each misuse throws an Error that names the op and the offending shapes/dtypes. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type Tensor, add, arange, broadcastTo, concat, expandDims, mT, pad, squeeze, exp, gather, grad, log, logsumexp, matmul, max, mean, mul, reshape, scatterAdd, slice, sqrt,
  sum, takeAlongAxis, tensor, transpose, valueAndGrad, where, zeros,
} from '../src/index.js';
import { rn } from './helpers/check.js';

/** Asserts fn throws an Error whose message contains every fragment. */
function throwsWith(fn: () => unknown, ...fragments: string[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof Error, `expected an Error, got ${String(e)}`);
    for (const f of fragments) assert.ok(e.message.includes(f), `message ${JSON.stringify(e.message)} lacks ${JSON.stringify(f)}`);
    return true;
  });
}

describe('shape errors', () => {
  test('add of [2,3] and [4] names the op and both shapes', () => {
    throwsWith(() => add(zeros([2, 3]), zeros([4])), 'add', '[2,3]', '[4]');
    throwsWith(() => mul(zeros([2, 3, 4]), zeros([3, 3])), 'mul', '[2,3,4]', '[3,3]');
    throwsWith(() => where(tensor([1, 0], [2], 'bool'), zeros([3]), zeros([3])), 'where', '[2]', '[3]');
  });

  test('matmul inner-dimension mismatch', () => {
    throwsWith(() => matmul(zeros([2, 3]), zeros([4, 5])), 'matmul', '[2,3]', '[4,5]', '3', '4');
    throwsWith(() => matmul(zeros([2, 3]), zeros([2, 5]), { transB: true }), 'matmul', '[2,3]', '[2,5]');
    throwsWith(() => matmul(zeros([2, 2, 3]), zeros([3, 3, 4])), 'matmul', '[2]', '[3]');
    // dtypes: only bfloat16 with float32 mixes; float32 is the only wider product (of bfloat16 operands)
    throwsWith(() => matmul(zeros([2, 3]), zeros([3, 4], 'float64')), 'matmul', 'dtype mismatch', 'float32[2,3]', 'float64[3,4]', 'only bfloat16 with float32');
    throwsWith(() => matmul(zeros([2, 3]), zeros([3, 4]), { outDType: 'float64' }), 'matmul', 'outDType float64', 'float32');
    throwsWith(() => matmul(zeros([3]), zeros([3, 4])), 'matmul', 'rank');
  });

  test('reshape to a wrong size', () => {
    throwsWith(() => reshape(zeros([2, 3]), [4]), 'reshape', '[2,3]', '[4]');
    throwsWith(() => reshape(zeros([2, 3]), [4, -1]), 'reshape', '[2,3]', '[4,-1]');
    throwsWith(() => reshape(zeros([2, 3]), [-1, -1]), 'reshape');
  });

  test('slice out of range', () => {
    const x = zeros([3, 4]);
    throwsWith(() => slice(x, [0], [5]), 'slice', '[3,4]');
    throwsWith(() => slice(x, [-5]), 'slice', '[3,4]');
    throwsWith(() => slice(x, [2], [1]), 'slice');
    throwsWith(() => slice(x, [0, 0, 0]), 'slice', '[3,4]');
  });

  test('other shape ops: squeeze, expandDims, pad, broadcastTo, mT', () => {
    throwsWith(() => squeeze(zeros([2, 3]), 0), 'squeeze', '[2,3]');
    throwsWith(() => expandDims(zeros([2, 3]), 4), 'expandDims', 'axis 4');
    throwsWith(() => pad(zeros([2]), [[-1, 0]]), 'pad');
    throwsWith(() => pad(zeros([2, 2]), [[1, 1]]), 'pad', '[2,2]');
    throwsWith(() => broadcastTo(zeros([3]), [4]), 'broadcastTo', '[3]', '[4]');
    throwsWith(() => broadcastTo(zeros([2, 3]), [3]), 'broadcastTo', '[2,3]', '[3]');
    throwsWith(() => mT(zeros([3])), 'mT', '[3]');
  });

  test('tensor: values that do not fill the shape, ragged nested arrays, bad shapes', () => {
    throwsWith(() => tensor([1, 2, 3], [2, 2]), 'tensor', '[2,2]');
    throwsWith(() => tensor([[1, 2], [3, 4, 5, 6], []] as unknown as number[][]), 'tensor', 'ragged');
    throwsWith(() => tensor([[1, 2, 3], [4, 5]]), 'tensor');
    throwsWith(() => tensor([[[1, 2], [3, 4]], [[5, 6, 7, 8]]] as unknown as number[][][]), 'tensor', 'ragged');
    throwsWith(() => zeros([2, -1]), 'full', '[2,-1]');
    throwsWith(() => zeros([1.5]), 'full', '[1.5]');
  });

  test('transpose with a bad perm', () => {
    const x = zeros([2, 3]);
    throwsWith(() => transpose(x, [0, 0]), 'transpose', '[2,3]');
    throwsWith(() => transpose(x, [0, 1, 2]), 'transpose', '[2,3]');
    throwsWith(() => transpose(x, [1, 2]), 'transpose');
  });

  test('bad axes and empty reductions', () => {
    throwsWith(() => sum(zeros([2, 3]), 2), 'sum', 'axis 2');
    throwsWith(() => max(zeros([2, 0]), 1), 'max', '[2,0]');
    throwsWith(() => logsumexp(zeros([2, 0]), 1), 'logsumexp', '[2,0]');
    throwsWith(() => concat([zeros([2, 3]), zeros([3, 3])], 1), 'concat', '[2,3]', '[3,3]');
    throwsWith(() => concat([]), 'concat');
  });
});

describe('dtype errors', () => {
  test('float32 + float64 names both dtypes', () => {
    throwsWith(() => add(zeros([2], 'float32'), zeros([2], 'float64')), 'add', 'float32', 'float64');
    throwsWith(() => matmul(zeros([2, 2], 'float32'), zeros([2, 2], 'float64')), 'matmul', 'float32', 'float64');
  });

  test('int32 input to a float-only op', () => {
    throwsWith(() => exp(arange(3)), 'exp', 'int32');
    throwsWith(() => log(arange(3)), 'log', 'int32');
    throwsWith(() => sqrt(arange(3)), 'sqrt', 'int32');
    throwsWith(() => mean(arange(3)), 'mean', 'int32');
    throwsWith(() => matmul(zeros([2, 2], 'int32'), zeros([2, 2], 'int32')), 'matmul', 'int32');
  });

  test('bool inputs and non-bool conditions', () => {
    throwsWith(() => add(tensor([1], [1], 'bool'), tensor([1], [1], 'bool')), 'add', 'bool');
    throwsWith(() => sum(tensor([1], [1], 'bool')), 'sum', 'bool');
    throwsWith(() => where(zeros([2]), zeros([2]), zeros([2])), 'where', 'bool');
  });

  test('indices must be int32', () => {
    throwsWith(() => gather(zeros([3, 2]), zeros([2])), 'gather', 'int32', 'float32');
  });
});

describe('index errors throw (never read or write garbage)', () => {
  const x = rn(1, [3, 4]);
  const idx = (v: number[]) => tensor(v, [v.length], 'int32');
  test('gather', () => {
    throwsWith(() => gather(x, idx([0, 3])), 'gather', '3');
    throwsWith(() => gather(x, idx([-1])), 'gather', '-1');
    throwsWith(() => gather(x, idx([4]), 1), 'gather', '4');
  });
  test('scatterAdd', () => {
    throwsWith(() => scatterAdd(x, idx([3]), rn(2, [1, 4])), 'scatterAdd', '3');
    throwsWith(() => scatterAdd(x, idx([-1]), rn(2, [1, 4])), 'scatterAdd', '-1');
    throwsWith(() => scatterAdd(x, idx([0]), rn(2, [2, 4])), 'scatterAdd', '[2,4]');
  });
  test('takeAlongAxis', () => {
    throwsWith(() => takeAlongAxis(x, tensor([0, 4, 1, 2, 3, 0], [3, 2], 'int32')), 'takeAlongAxis', '4');
    throwsWith(() => takeAlongAxis(x, tensor([0, -1, 1, 2, 3, 0], [3, 2], 'int32')), 'takeAlongAxis', '-1');
    throwsWith(() => takeAlongAxis(x, tensor([3, 0, 1, 2], [1, 4], 'int32'), 0), 'takeAlongAxis', '3');
    throwsWith(() => takeAlongAxis(x, tensor([0, 1], [2, 1], 'int32')), 'takeAlongAxis', '[2,1]');
  });
});

describe('lifecycle and transform errors', () => {
  test('using a disposed tensor throws', () => {
    const t = rn(3, [2, 2]);
    t.dispose();
    assert.ok(t.isDisposed);
    throwsWith(() => add(t, 1), 'dispose');
    throwsWith(() => t.toArray(), 'dispose');
    throwsWith(() => exp(t), 'dispose');
  });

  test('grad of a function returning a non-scalar throws', () => {
    const x = rn(4, [2, 3]);
    throwsWith(() => grad((t: Tensor) => mul(t, 2))(x), 'grad', 'scalar', '[2,3]');
    throwsWith(() => valueAndGrad((t: Tensor) => sum(t, 0))(x), 'grad', 'scalar', '[3]');
    throwsWith(() => grad((_t: Tensor) => 3 as unknown as Tensor)(x), 'grad', 'scalar');
    throwsWith(() => grad((t: Tensor) => sum(t), { argnums: 2 })(x), 'grad', 'argnum');
    // the failed transforms left no trace open: a later grad still works
    assert.deepEqual(grad((t: Tensor) => sum(t))(x).toArray(), [1, 1, 1, 1, 1, 1]);
  });
});
