/** Method sugar on Tensor (`x.add(y).sum()`), forwarding to the op functions. */
import * as ops from './ops.js';
import type { DType } from './dtype.js';
import type { Shape } from './shape.js';
import { Tensor } from './tensor.js';

type T = ops.TensorLike;
declare module './tensor.js' {
  interface Tensor {
    add(o: T): Tensor;
    sub(o: T): Tensor;
    mul(o: T): Tensor;
    div(o: T): Tensor;
    pow(o: T): Tensor;
    neg(): Tensor;
    exp(): Tensor;
    log(): Tensor;
    sqrt(): Tensor;
    square(): Tensor;
    tanh(): Tensor;
    sum(axes?: number | number[], keepdims?: boolean): Tensor;
    mean(axes?: number | number[], keepdims?: boolean): Tensor;
    max(axes?: number | number[], keepdims?: boolean): Tensor;
    matmul(o: Tensor, opts?: ops.MatmulOptions): Tensor;
    reshape(shape: Shape): Tensor;
    transpose(perm?: number[]): Tensor;
    cast(dtype: DType): Tensor;
  }
}

const P = Tensor.prototype;
P.add = function (o) { return ops.add(this, o); };
P.sub = function (o) { return ops.sub(this, o); };
P.mul = function (o) { return ops.mul(this, o); };
P.div = function (o) { return ops.div(this, o); };
P.pow = function (o) { return ops.pow(this, o); };
P.neg = function () { return ops.neg(this); };
P.exp = function () { return ops.exp(this); };
P.log = function () { return ops.log(this); };
P.sqrt = function () { return ops.sqrt(this); };
P.square = function () { return ops.square(this); };
P.tanh = function () { return ops.tanh(this); };
P.sum = function (axes, keepdims) { return ops.sum(this, axes, keepdims); };
P.mean = function (axes, keepdims) { return ops.mean(this, axes, keepdims); };
P.max = function (axes, keepdims) { return ops.max(this, axes, keepdims); };
P.matmul = function (o, opts) { return ops.matmul(this, o, opts); };
P.reshape = function (shape) { return ops.reshape(this, shape); };
P.transpose = function (perm) { return ops.transpose(this, perm); };
P.cast = function (dtype) { return ops.cast(this, dtype); };
