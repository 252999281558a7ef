"""The entropic transport solver behind `keras_softquantile.ops.transport`, one concept a module.

* `problem`: the problem object (validated, renormalised inputs), its tolerance, the result.
* `kernels`: one pass over the data: memberships, residual, covariance, the Newton direction.
* `warm_start`: the epsilon -> 0 limit boundaries (by sorting or by counting bisection).
* `newton`: the safeguarded Newton loop and `solve_newton`.
* `sinkhorn`: log-domain Sinkhorn, polished by Newton steps (`solve_sinkhorn`).
* `implicit`: the memberships at the solution with their implicit gradient, and diagnostics.

`keras_softquantile.ops.transport` is the documented public module; this package is private.
"""
