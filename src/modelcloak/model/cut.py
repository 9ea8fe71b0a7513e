"""Cut an ONNX graph into a public front and a private back (issue 3, split inference).

A *cut* is the set of tensors that crosses from the public part (shipped in the clear, run in
onnxruntime on any hardware) to the private part (sealed, run in the enclave). This module lists
every valid cut of a graph with what the private part costs, picks one by node, tensors, "last N
layers" or index, and builds the two models.

Definitions (also in the `splits` documentation):

* **Node order.** The graph's own node order when it is a valid topological order, else Kahn's
  algorithm that always takes the ready node that comes first in the graph (deterministic).
  Nodes that feed no graph output (dead code) are dropped, as `onnx.utils.Extractor` would.
  Unnamed nodes are named `<op_type>_<i>` (i = index in the graph's node list); a repeated name
  gets `_<i>` appended. The parts carry these names, so cuts can be named by them.
* **Static and dynamic tensors.** A tensor is *dynamic* when it depends on a graph input, *static*
  when it is computed from initializers and Constant nodes alone (e.g. a transposed weight).
  Static tensors never cross a cut: each part recomputes the constant subgraphs it needs (and
  gets copies of the initializers it uses), so weights are never passed through the boundary.
* **Candidate cut after position i.** Public = the dynamic nodes at positions <= i, private = the
  dynamic nodes after i; each side adds the constant subgraphs it needs. The boundary is every
  dynamic tensor produced by the public side, or a graph input, that the private side consumes
  (explicitly or from inside an If/Loop/Scan body), so a skip connection's tensor crosses too.
  Cuts are only placed after dynamic nodes: a cut after a static node is the same cut as the one
  before it. A cut is valid when the public side produces no graph output, the private side holds
  at least one *parameter* (see below), and every boundary tensor's dtype and rank are known.
* **Parameters and layers.** A parameter is an initializer or Constant-node tensor with at least two
  elements of a floating-point or <= 8-bit integer type (quantised weights); int32/int64 tensors
  (shapes, axes, indices), bools and scalars such as an epsilon are plumbing, not confidential.
  A *layer* is a dynamic node that consumes (directly or through a constant subgraph) either a
  parameter of rank >= 2 as a weight-op (MatMul, Gemm, Conv, ConvTranspose, Gather, Einsum,
  RNN/LSTM/GRU and their integer/QLinear forms), or any parameter with at least two dims > 1: so
  a Dense(1) head counts, while biases (also when stored as [1,1,1,C]) and BatchNorm/LayerNorm
  parameters belong to the layer around them and are not layers of their own.
* **"last N".** The latest candidate cut whose private side holds exactly N layers, i.e. the
  smallest private part that still contains the last N weight-carrying layers (the activations
  between layer N+1 from the end and layer N from the end stay public).
* **Statistics.** `private_parameters`/`private_weight_bytes`: all initializers and Constant
  tensors the private model holds (shared ones counted on both sides). `private_flops`: 2 x
  multiply-adds of MatMul, Gemm, Conv, ConvTranspose and their integer/QLinear variants at batch
  1, from inferred shapes; bias adds, normalisation, activations, pooling and Gather are not
  counted, nor are constant subgraphs (onnxruntime folds them at load). `boundary_bytes`: bytes
  per sample crossing the cut. Symbolic dims other than the batch count as 1 in both; a node
  whose shapes cannot be determined contributes 0 FLOPs.
* **Shapes.** `onnx.shape_inference` (with data propagation) types every tensor it can; tensors
  whose dtype, rank or dims it leaves unknown are measured by running the whole model in
  onnxruntime: once with every symbolic input dim at its own size, then once per symbol with only
  that symbol moved by one. A dim that never moves is fixed; one that equals one symbol in every
  run takes that symbol's name (e.g. "batch", "seq"); any other moving dim stays symbolic but
  unnamed (None). No symbolic dim is ever frozen to the size it had in a probe.
* **Verification.** `verify_split` runs the public and private parts at two sizes of every
  symbolic dim and checks each boundary tensor against its declared shape and the outputs against
  the whole model; `protect` calls it, so a split bundle that cannot run its own declared inputs
  is never written.
* **Batch axis.** `batch_symbol`: a symbolic input dim named like "batch" wherever it sits (axis 1
  of a sequence-first RNN), else the first input's dim 0. The enclave's query budget counts rows
  of that axis.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

from modelcloak.model.errors import ModelError
from modelcloak.model.importer import TensorSpec, shape_dims

# Ops whose output is not a function of their inputs: treated as dynamic so their values are
# computed once, on one side, and crossed like activations instead of being drawn twice.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})

# FLOP-counted ops: (index of the activation input, index of the weight input) for the ops whose
# cost is out x K (MatMul family) or out x weight-fan-in (Conv family).
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}

# Ops whose rank >= 2 parameter is a weight matrix/kernel/table: they are layers even when the
# parameter has only one dim > 1 (a Dense(1) head's [K, 1] weight).
_WEIGHT_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "Conv",
        "ConvTranspose",
        "Gather",
        "Einsum",
        "RNN",
        "LSTM",
        "GRU",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
    }
)

_FLOAT_TYPES = frozenset(
    getattr(TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT8E8M0",
        "FLOAT6E2M3",
        "FLOAT6E3M2",
        "FLOAT4E2M1",
    )
    if hasattr(TensorProto, name)
)
# Quantised weights are stored as <= 8-bit integers; wider integers are shapes, axes and indices.
_QUANT_TYPES = frozenset(
    getattr(TensorProto, name)
    for name in ("INT8", "UINT8", "INT4", "UINT4", "INT2", "UINT2")
    if hasattr(TensorProto, name)
)
_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, name)
}

_DEFAULT_BATCH = "batch"
# Sizes the shape probe gives symbolic dims: (first symbol's base, step between symbols), tried in
# order until the model runs. Each symbol gets its own base, and each probe run moves one symbol
# to base + 1, so no two symbols (and no symbol and a fixed dim) are confused by coincidence.
_PROBE_SCALES = ((3, 2), (17, 4), (67, 8))
# Floating inputs are probed with this value instead of zeros: a dim that depends on values (e.g.
# NonZero) is then less likely to collapse to 0 on both runs.
_PROBE_FILL = 0.5


@dataclass(frozen=True)
class Cut:
    """One way to split a model; see the module docstring for every definition."""

    index: int  # position in candidate_cuts() (0 = earliest cut); -1: valid, but not a prefix of the order
    after_node: str  # the last public node in the chosen topological order
    tensors: tuple[str, ...]  # the boundary, in order: graph inputs first, then by producing node
    private_nodes: int  # nodes in the private model, constant subgraphs included
    private_parameters: int  # elements of the initializers and Constant tensors the private model holds
    private_weight_bytes: int  # their bytes
    private_flops: int  # 2 x multiply-adds of MatMul/Gemm/Conv/ConvTranspose (+ integer variants), batch 1
    boundary_bytes: int  # bytes per sample crossing the cut (batch and other symbolic dims = 1)
    boundary: tuple[TensorSpec, ...]  # name, dtype and shape of each boundary tensor
    private_layers: int = 0  # weight-carrying nodes in the private part (the N of "last N")


@dataclass(frozen=True)
class _Weight:
    dims: tuple[int, ...] | None  # None: a Constant whose shape is not stored as dims
    data_type: int
    elements: int
    nbytes: int
    parameter: bool  # counts as confidential (see "Parameters and layers")

    @property
    def rank(self) -> int:
        return len(self.dims) if self.dims is not None else 0

    @property
    def matrix_like(self) -> bool:
        """At least two dims > 1: a weight matrix or kernel, not a (broadcast) vector."""
        return self.dims is not None and sum(d > 1 for d in self.dims) >= 2


@dataclass(frozen=True)
class _Closure:
    """What a tensor needs from the constant world: static nodes (by position) and weights."""

    nodes: frozenset[int]
    weights: frozenset[str]


class _Graph:
    """Everything cut needs to know about one model, computed once per call."""

    def __init__(self, model: onnx.ModelProto) -> None:
        if not isinstance(model, onnx.ModelProto):
            raise ModelError(f"expected an onnx.ModelProto, got {type(model).__name__}")
        graph = model.graph
        if not graph.node:
            raise ModelError("model has an empty graph; there is nothing to cut")
        self.model = model
        self.names = _node_names(graph.node)
        self.all_names = set(self.names)

        self.weights: dict[str, _Weight] = {}
        for tensor in graph.initializer:
            self.weights[tensor.name] = _weight_of(tensor.dims, tensor.data_type)
        for sparse in graph.sparse_initializer:
            self.weights[sparse.values.name] = _weight_of(sparse.dims, sparse.values.data_type)
        self.inputs = [v.name for v in graph.input if v.name not in self.weights]
        self.outputs = [v.name for v in graph.output]
        if not self.outputs:
            raise ModelError("model has no graph outputs; there is nothing to cut")

        all_nodes = list(graph.node)
        uses = [_node_uses(node) for node in all_nodes]
        order = _topological_order(all_nodes, uses, set(self.inputs) | set(self.weights))
        order = _live(order, all_nodes, uses, set(self.outputs))
        # From here on, positions index `self.nodes`, the live nodes in the chosen order.
        self.nodes = [all_nodes[k] for k in order]
        self.node_names = [self.names[k] for k in order]
        self.uses = [uses[k] for k in order]
        self.position = {name: p for p, name in enumerate(self.node_names)}
        self.producer: dict[str, int] = {}
        for p, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = p
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                self.weights[node.output[0]] = _constant_weight(node)

        # Dynamic = depends on a graph input; static nodes only ever see initializers/Constants.
        self.dynamic_tensors: set[str] = set(self.inputs)
        self.dynamic_node: list[bool] = []
        for p, node in enumerate(self.nodes):
            dynamic = any(t in self.dynamic_tensors for t in self.uses[p]) or (
                node.op_type in _RANDOM_OPS and node.domain in ("", "ai.onnx")
            )
            self.dynamic_node.append(dynamic)
            if dynamic:
                self.dynamic_tensors.update(o for o in node.output if o)

        self._closures: dict[str, _Closure] = {}
        self.node_closure = [self._closure_of_uses(p) for p in range(len(self.nodes))]
        self.is_layer = [self._is_layer(p) for p in range(len(self.nodes))]
        self.types = _TypeTable(self)
        self.flops = [self._flops(p) if self.dynamic_node[p] else 0 for p in range(len(self.nodes))]

    # -- constant closures -------------------------------------------------------------------

    def _closure(self, tensor: str) -> _Closure:
        """Static nodes and weights behind a static tensor (empty for dynamic tensors)."""
        if tensor in self._closures:
            return self._closures[tensor]
        if tensor in self.dynamic_tensors:
            closure = _Closure(frozenset(), frozenset())
        elif tensor in self.producer:
            p = self.producer[tensor]
            inner = self._closure_of_uses(p)
            own = {tensor} if tensor in self.weights else set()  # a Constant node's own tensor
            closure = _Closure(inner.nodes | {p}, inner.weights | own)
        elif tensor in self.weights:
            closure = _Closure(frozenset(), frozenset({tensor}))
        else:  # an optional input left empty, or a name the graph never defines (checker's problem)
            closure = _Closure(frozenset(), frozenset())
        self._closures[tensor] = closure
        return closure

    def _closure_of_uses(self, p: int) -> _Closure:
        # Static chains are short in practice (Transpose/Cast/DequantizeLinear of a weight), and
        # they are visited in topological order, so this recursion stays shallow.
        nodes: set[int] = set()
        weights: set[str] = set()
        for tensor in self.uses[p]:
            if tensor in self.dynamic_tensors:
                continue
            closure = self._closure(tensor)
            nodes |= closure.nodes
            weights |= closure.weights
        return _Closure(frozenset(nodes), frozenset(weights))

    def _is_layer(self, p: int) -> bool:
        if not self.dynamic_node[p]:
            return False
        weight_op = self.nodes[p].op_type in _WEIGHT_OPS
        for name in self.node_closure[p].weights:
            weight = self.weights[name]
            if weight.parameter and (weight.matrix_like or (weight_op and weight.rank >= 2)):
                return True
        return False

    # -- FLOPs -------------------------------------------------------------------------------

    def _flops(self, p: int) -> int:
        node = self.nodes[p]
        if node.domain not in ("", "ai.onnx"):
            return 0
        inputs = list(node.input)

        def shape(i: int) -> list[int] | None:
            return self.types.concrete_shape(inputs[i]) if i < len(inputs) and inputs[i] else None

        out = self.types.concrete_shape(node.output[0]) if node.output else None
        if node.op_type in _MATMUL_OPS:
            a = shape(_MATMUL_OPS[node.op_type][0])
            if a is None or out is None or not a:
                return 0
            return 2 * math.prod(out) * a[-1]
        if node.op_type == "Gemm":
            a = shape(0)
            if a is None or out is None or len(a) != 2:
                return 0
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            return 2 * math.prod(out) * (a[0] if trans_a else a[1])
        if node.op_type in _CONV_OPS:
            w = shape(_CONV_OPS[node.op_type][1])
            if w is None or out is None or len(w) < 2:
                return 0
            return 2 * math.prod(out) * math.prod(w[1:])
        if node.op_type == "ConvTranspose":
            x, w = shape(0), shape(1)
            if x is None or w is None or len(w) < 2:
                return 0
            # Every input element is multiplied into a (C_out/group x kernel) patch.
            return 2 * math.prod(x) * math.prod(w[1:])
        return 0

    # -- cuts --------------------------------------------------------------------------------

    def candidates(self) -> list[Cut]:
        """Every valid prefix cut of the chosen order, earliest first."""
        n = len(self.nodes)
        # No cut may leave a graph output on the public side; an output that is a graph input (or
        # a weight) can never be produced by the private side, so such a model has no cut at all.
        first_output = n
        for name in self.outputs:
            if name in self.inputs:
                return []
            if name in self.dynamic_tensors:
                first_output = min(first_output, self.producer[name])

        last_use: dict[str, int] = {}
        for p in range(n):
            for tensor in self.uses[p]:
                if tensor in self.dynamic_tensors:
                    last_use[tensor] = p

        # Private-side statistics for "cut after p" from a backward sweep (state = nodes > p). A
        # graph output computed from weights alone is always rebuilt on the private side.
        stats: dict[int, tuple[int, int, int, int, int, bool]] = {}
        static_nodes: set[int] = set()
        weights: set[str] = set()
        for name in self.outputs:
            static_nodes |= self._closure(name).nodes
            weights |= self._closure(name).weights
        parameters = sum(self.weights[w].elements for w in weights)
        weight_bytes = sum(self.weights[w].nbytes for w in weights)
        confidential = any(self.weights[w].parameter for w in weights)
        dynamic_count = layers = flops = 0
        for p in range(n - 1, -1, -1):
            if self.dynamic_node[p] and p < first_output:
                stats[p] = (
                    dynamic_count + len(static_nodes),
                    parameters,
                    weight_bytes,
                    flops,
                    layers,
                    confidential,
                )
            if not self.dynamic_node[p]:
                continue
            dynamic_count += 1
            layers += self.is_layer[p]
            flops += self.flops[p]
            closure = self.node_closure[p]
            static_nodes |= closure.nodes
            for name in closure.weights - weights:
                weight = self.weights[name]
                weights.add(name)
                parameters += weight.elements
                weight_bytes += weight.nbytes
                confidential = confidential or weight.parameter

        # Boundary for "cut after p", kept incrementally: live dynamic tensors produced so far.
        live = {name: -1 for name in self.inputs if last_use.get(name, -1) > -1}
        cuts: list[Cut] = []
        for p in range(n):
            for out in self.nodes[p].output:
                if out in self.dynamic_tensors and last_use.get(out, -1) > p:
                    live[out] = p
            for name in [t for t in live if last_use[t] <= p]:
                del live[name]
            if p not in stats:
                continue
            private_nodes, parameters, weight_bytes, flops, layers, confidential = stats[p]
            if not confidential:
                continue
            boundary = self._boundary_specs(sorted(live, key=self._boundary_key))
            if boundary is None:
                continue
            cuts.append(
                Cut(
                    index=len(cuts),
                    after_node=self.node_names[p],
                    tensors=tuple(spec.name for spec in boundary),
                    private_nodes=private_nodes,
                    private_parameters=parameters,
                    private_weight_bytes=weight_bytes,
                    private_flops=flops,
                    boundary_bytes=sum(_spec_bytes(spec) for spec in boundary),
                    boundary=boundary,
                    private_layers=layers,
                )
            )
        return cuts

    def _boundary_key(self, name: str) -> tuple[int, int]:
        """Graph inputs first (in input order), then by producing node and output slot."""
        if name in self.producer:
            p = self.producer[name]
            return (p + len(self.inputs), list(self.nodes[p].output).index(name))
        return (self.inputs.index(name), 0)

    def _boundary_specs(self, names: Iterable[str]) -> tuple[TensorSpec, ...] | None:
        specs = tuple(self.types.spec(name) for name in names)
        return None if any(spec is None for spec in specs) else specs  # type: ignore[return-value]

    def sides(self, tensors: Sequence[str]) -> tuple[list[int], list[int]]:
        """The (public, private) dynamic node positions for a boundary, or a ModelError saying why not."""
        crossing = list(dict.fromkeys(tensors))
        if not crossing:
            raise ModelError("a cut needs at least one boundary tensor")
        for name in crossing:
            if name in self.dynamic_tensors:
                continue
            if name in self.weights or name in self.producer:
                raise ModelError(
                    f"tensor {name!r} is a constant (computed from weights only); constants never cross a cut"
                )
            raise ModelError(f"the model has no tensor named {name!r}")
        outputs = [name for name in crossing if name in self.outputs]
        if outputs:
            raise ModelError(f"tensor {outputs[0]!r} is a graph output; the private part must produce every output")
        stop = set(crossing)

        # Private side: everything the graph outputs need, stopping at the boundary.
        private: set[int] = set()
        reached: set[str] = set()
        stack = list(self.outputs)
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name not in self.dynamic_tensors:
                continue
            seen.add(name)
            if name in stop:
                reached.add(name)
                continue
            if name not in self.producer:  # a graph input the boundary does not carry
                raise ModelError(
                    f"tensors {crossing} do not separate the graph: the private part would also need "
                    f"graph input {name!r}"
                )
            p = self.producer[name]
            if p not in private:
                private.add(p)
                stack.extend(self.uses[p])
        unused = [name for name in crossing if name not in reached]
        if unused:
            raise ModelError(
                f"tensor {unused[0]!r} does not cross this cut: the private part never uses it "
                "(the tensors given do not form one cut)"
            )

        # Public side: everything the boundary tensors need.
        public: set[int] = set()
        stack = [name for name in crossing if name in self.producer]
        if not stack:
            raise ModelError("every boundary tensor is a graph input: the public part would compute nothing")
        seen = set()
        while stack:
            name = stack.pop()
            if name in seen or name not in self.producer or name not in self.dynamic_tensors:
                continue
            seen.add(name)
            p = self.producer[name]
            if p in private:
                raise ModelError(
                    f"tensors {crossing} do not separate the graph: node {self.node_names[p]!r} would run on both sides"
                )
            if p not in public:
                public.add(p)
                stack.extend(self.uses[p])
        return sorted(public), sorted(private)

    def cut_for(self, tensors: Sequence[str], candidates: list[Cut]) -> Cut:
        """The Cut whose boundary is exactly `tensors` (validated), matching a candidate when one does."""
        public, private = self.sides(tensors)
        wanted = set(tensors)
        for cut in candidates:
            if set(cut.tensors) == wanted:
                return cut
        # A valid separation that is not a prefix of the chosen order (possible with parallel
        # branches): describe it the same way, with index -1.
        closure_nodes: set[int] = set()
        weights: set[str] = set()
        for name in self.outputs:
            closure_nodes |= self._closure(name).nodes
            weights |= self._closure(name).weights
        for p in private:
            closure_nodes |= self.node_closure[p].nodes
            weights |= self.node_closure[p].weights
        if not any(self.weights[w].parameter for w in weights):
            raise ModelError("this cut leaves nothing confidential: the private part holds no weights; cut earlier")
        ordered = sorted(wanted, key=self._boundary_key)
        boundary = self._boundary_specs(ordered)
        if boundary is None:
            unknown = [name for name in ordered if self.types.spec(name) is None]
            raise ModelError(f"the dtype or rank of boundary tensor {unknown[0]!r} could not be determined")
        return Cut(
            index=-1,
            after_node=self.node_names[max(public)],
            tensors=tuple(ordered),
            private_nodes=len(private) + len(closure_nodes),
            private_parameters=sum(self.weights[w].elements for w in weights),
            private_weight_bytes=sum(self.weights[w].nbytes for w in weights),
            private_flops=sum(self.flops[p] for p in private),
            boundary_bytes=sum(_spec_bytes(spec) for spec in boundary),
            boundary=boundary,
            private_layers=sum(self.is_layer[p] for p in private),
        )

    def why_not_after(self, p: int) -> str:
        """A one-line reason why the cut after node position p is not a candidate."""
        name = self.node_names[p]
        if not self.dynamic_node[p]:
            return f"node {name!r} only computes constants; a cut after it is the cut before it"
        produced = [o for o in self.outputs if o in self.dynamic_tensors and self.producer.get(o, -1) <= p]
        if produced:
            return f"the public part would produce graph output {produced[0]!r}"
        if any(o in self.inputs for o in self.outputs):
            return "a graph output is a graph input, so no cut can leave every output to the private part"
        return (
            f"a cut after node {name!r} leaves nothing confidential (the private part holds no weights), "
            "or the dtype of a tensor crossing it is unknown"
        )


class _TypeTable:
    """dtype and shape of every tensor, from shape inference, with an onnxruntime probe as fallback."""

    def __init__(self, graph: _Graph) -> None:
        self.graph = graph
        model = graph.model
        self.batch = _batch_symbol(model)
        self.types: dict[str, tuple[int, list[int | str | None] | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # inference is best effort here; the probe below fills the gaps
            inferred = model
        # Later sources win when they know more: the exporter's value_info, then inference, then
        # the declared graph outputs (which carry the model's own symbolic batch name).
        sources = [
            *model.graph.value_info,
            *inferred.graph.value_info,
            *inferred.graph.input,
            *inferred.graph.output,
            *model.graph.output,
        ]
        for value in sources:
            entry = _value_type(value)
            if entry is not None and (value.name not in self.types or _complete(entry)):
                self.types[value.name] = entry
        for name, weight in graph.weights.items():
            if weight.dims is not None:
                self.types[name] = (weight.data_type, list(weight.dims))
        self._probe(
            [
                name
                for name in sorted(graph.dynamic_tensors | self._flop_tensors())
                if name in graph.producer and not _complete(self.types.get(name))
            ]
        )

    def _flop_tensors(self) -> set[str]:
        names: set[str] = set()
        for node in self.graph.nodes:
            if node.op_type in _MATMUL_OPS or node.op_type in _CONV_OPS or node.op_type in ("Gemm", "ConvTranspose"):
                names.update(t for t in node.input[:4] if t)
                names.update(t for t in node.output[:1] if t)
        return names

    def _probe(self, names: list[str]) -> None:
        """Run the model with `names` as extra outputs and read their dtypes and shapes.

        Every symbolic input dim is varied on its own (see `_probe_plans`), so a dim that follows
        one symbol exactly takes that symbol's name, a dim that changes in any other way stays
        dynamic (None), and only a dim that never changes is written down as a number.
        """
        if not names:
            return
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(self.graph.model)
        existing = {o.name for o in probe.graph.output}
        for name in names:
            if name in existing:
                continue
            elem = self.types.get(name, (0, None))[0]
            if elem:
                probe.graph.output.append(helper.make_tensor_value_info(name, elem, None))
            else:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
        try:
            session = ort.InferenceSession(
                probe.SerializeToString(), _quiet_options(), providers=["CPUExecutionProvider"]
            )
        except Exception:  # e.g. a custom op onnxruntime lacks: those tensors stay unknown
            return
        wanted = [o.name for o in session.get_outputs()]
        inputs = [v for v in self.graph.model.graph.input if v.name not in self.graph.weights]
        measured = None
        for symbols, plans in _probe_plans(inputs, self.batch):
            try:
                runs = [dict(zip(wanted, session.run(wanted, _probe_feeds(inputs, plan)))) for plan in plans]
            except Exception:  # sizes this model refuses (e.g. shorter than a kernel): try larger ones
                continue
            measured = (symbols, plans, runs)
            break
        if measured is None:
            return
        symbols, plans, runs = measured
        for name in names:
            if not all(isinstance(run[name], np.ndarray) for run in runs):
                continue
            shapes = [run[name].shape for run in runs]
            if any(len(shape) != len(shapes[0]) for shape in shapes):
                continue
            dims = [_name_dim([shape[axis] for shape in shapes], symbols, plans) for axis in range(len(shapes[0]))]
            try:
                elem = helper.np_dtype_to_tensor_dtype(runs[0][name].dtype)
            except (KeyError, ValueError, TypeError):
                continue
            self.types[name] = (elem, dims)

    def spec(self, name: str) -> TensorSpec | None:
        """dtype and shape for a boundary tensor; None when the dtype or the rank is unknown.

        Dims still unknown after the probe (it failed, or they grow with the batch without being
        the batch) are None; inference's "unk__N" placeholders are reported as None too.
        """
        elem, dims = self.types.get(name, (0, None))
        if not elem or dims is None:
            return None
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
        except (KeyError, TypeError, ValueError):
            return None
        shape = tuple(None if isinstance(d, str) and d.startswith("unk__") else d for d in dims)
        return TensorSpec(name, dtype, shape)

    def elem_type(self, name: str) -> int:
        return self.types[name][0]

    def concrete_shape(self, name: str) -> list[int] | None:
        """The shape at batch 1, other symbolic dims as 1; None when the rank is unknown."""
        entry = self.types.get(name)
        if entry is None or entry[1] is None:
            return None
        return [d if isinstance(d, int) else 1 for d in entry[1]]


# -- public API ------------------------------------------------------------------------------


def candidate_cuts(model: onnx.ModelProto) -> list[Cut]:
    """Every valid cut of `model`, earliest (largest private part) first.

    Returns an empty list when the model has no valid cut (e.g. no weights at all, or a graph
    output that is a graph input).
    """
    return _Graph(model).candidates()


def find_cut(
    model: onnx.ModelProto,
    *,
    after_node: str | None = None,
    tensors: Sequence[str] | None = None,
    last: int | None = None,
    index: int | None = None,
) -> Cut:
    """Pick one cut with exactly one selector.

    Args:
        after_node: the cut right after this node (names as in the model, or `<op_type>_<i>` for
            unnamed nodes); it must be a candidate.
        tensors: the exact boundary. Any set of tensors that separates the graph is accepted, also
            one that is not a prefix of the chosen node order (then `index` is -1).
        last: leave the last N layers private: the latest cut whose private part holds exactly N
            weight-carrying nodes (see the module docstring).
        index: position in `candidate_cuts(model)`.

    Raises:
        ModelError: zero or several selectors, or a selector that names no valid cut.
    """
    given = {
        name: value
        for name, value in (("after_node", after_node), ("tensors", tensors), ("last", last), ("index", index))
        if value is not None
    }
    if len(given) != 1:
        names = ", ".join(given) if given else "none"
        raise ModelError(f"choose a cut with exactly one of after_node, tensors, last or index (got: {names})")
    graph = _Graph(model)
    cuts = graph.candidates()

    if tensors is not None:
        wanted = [tensors] if isinstance(tensors, str) else list(tensors)
        if not all(isinstance(t, str) for t in wanted):
            raise ModelError("tensors must be a list of tensor names")
        return graph.cut_for(wanted, cuts)
    if not cuts:
        raise ModelError("the model has no valid cut: no split leaves weights on the private side")
    if after_node is not None:
        if after_node in graph.all_names and after_node not in graph.position:
            raise ModelError(f"node {after_node!r} feeds no graph output (dead code), so no cut is placed after it")
        if after_node not in graph.position:
            known = ", ".join(graph.node_names[:5])
            raise ModelError(f"the model has no node named {after_node!r} (nodes are named like: {known}, ...)")
        for cut in cuts:
            if cut.after_node == after_node:
                return cut
        raise ModelError(f"no valid cut after node {after_node!r}: {graph.why_not_after(graph.position[after_node])}")
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ModelError(f"last must be a positive number of layers, got {last!r}")
        matching = [cut for cut in cuts if cut.private_layers == last]
        if matching:
            return matching[-1]
        total = sum(graph.is_layer)
        if last > total:
            raise ModelError(f"last={last} asks for more layers than the model has ({total} weight-carrying nodes)")
        available = sorted({cut.private_layers for cut in cuts})
        raise ModelError(f"no valid cut leaves exactly the last {last} layers private; possible counts: {available}")
    assert index is not None
    if isinstance(index, bool) or not isinstance(index, int):
        raise ModelError(f"index must be an integer, got {index!r}")
    if not 0 <= index < len(cuts):
        raise ModelError(
            f"cut index {index} is out of range: the model has {len(cuts)} candidate cuts (0-{len(cuts) - 1})"
        )
    return cuts[index]


def split_model(model: onnx.ModelProto, cut: Cut) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Build the (public, private) models for `cut`.

    The public model takes the original graph inputs (all of them, so a caller can feed it what it
    would feed the whole model) and outputs the boundary tensors it produces. The private model
    takes the boundary tensors, in `cut.tensors` order (graph inputs among them are fed straight
    from the caller), and outputs the original graph outputs in order. Each part holds only the
    nodes, initializers and model-local functions it uses; both keep every opset import, the
    dynamic batch axis and the node names of the chosen order, and both pass
    `onnx.checker.check_model(full_check=True)`.
    """
    graph = _Graph(model)
    public, private = graph.sides(list(cut.tensors))
    boundary = graph._boundary_specs(cut.tensors)
    if boundary is None:
        raise ModelError("the dtype or rank of a boundary tensor could not be determined; this cut cannot be built")
    crossing = set(cut.tensors)

    public_outputs = [
        helper.make_tensor_value_info(spec.name, graph.types.elem_type(spec.name), list(spec.shape))
        for spec in boundary
        if spec.name in graph.producer
    ]
    public_inputs = [v for v in model.graph.input if v.name not in graph.weights]
    private_inputs = [
        helper.make_tensor_value_info(spec.name, graph.types.elem_type(spec.name), list(spec.shape))
        for spec in boundary
    ]
    private_outputs = list(model.graph.output)

    public_model = _build_part(graph, public, public_inputs, public_outputs, "public", exclude=set())
    static_outputs = [name for name in graph.outputs if name not in graph.dynamic_tensors]
    private_model = _build_part(
        graph, private, private_inputs, private_outputs, "private", exclude=crossing, static_outputs=static_outputs
    )
    for part, label in ((public_model, "public"), (private_model, "private")):
        try:
            onnx.checker.check_model(part, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ModelError(
                f"the {label} part of the cut after {cut.after_node!r} is not a valid model: {first}"
            ) from None
    return public_model, private_model


def verify_split(model: onnx.ModelProto, public: onnx.ModelProto, private: onnx.ModelProto, cut: Cut) -> None:
    """Run the parts the way a split bundle will, at two sizes of every symbolic dim, and refuse
    a cut whose parts do not reproduce the whole model.

    Checked at each size: every boundary tensor the public part produces has the dtype and shape
    the cut declares (a fixed dim must match; a symbolic one is free), the private part accepts
    the boundary, and its outputs equal the whole model's (rtol 1e-3, atol 1e-4: the parts are
    optimised separately). A model that onnxruntime cannot run on probe inputs at all (every size
    tried fails) cannot be checked this way and passes unchecked.

    Raises:
        ModelError: one line naming the cut, the size and what went wrong.
    """
    import onnxruntime as ort

    def session(part: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(part.SerializeToString(), _quiet_options(), providers=["CPUExecutionProvider"])

    inputs = [v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    whole = session(model)
    chosen: tuple[list[str], list[dict[str, int]]] | None = None
    for symbols, plans in _probe_plans(inputs, _batch_symbol(model)):
        moved = {symbol: size + 1 for symbol, size in plans[0].items()}
        sizes = [plans[0], moved]
        try:
            expected = [whole.run(None, _probe_feeds(inputs, plan)) for plan in sizes]
        except Exception:
            continue
        chosen = (symbols, sizes)
        break
    if chosen is None:
        return
    where = f"the cut after {cut.after_node!r}"
    try:
        public_session, private_session = session(public), session(private)
    except Exception as exc:
        raise ModelError(f"{where} builds a part onnxruntime cannot load: {_first_line(exc)}") from None
    specs = {spec.name: spec for spec in cut.boundary}
    for plan, want in zip(chosen[1], expected):
        described = ", ".join(f"{k}={v}" for k, v in plan.items() if not k.startswith("\0"))
        feeds = _probe_feeds(inputs, plan)
        try:
            produced = dict(zip([o.name for o in public_session.get_outputs()], public_session.run(None, feeds)))
        except Exception as exc:
            raise ModelError(f"the public part of {where} fails at {described}: {_first_line(exc)}") from None
        boundary = {name: produced[name] if name in produced else feeds[name] for name in cut.tensors}
        for name, value in boundary.items():
            spec = specs[name]
            fits = value.ndim == len(spec.shape) and all(
                not isinstance(d, int) or d == got for d, got in zip(spec.shape, value.shape)
            )
            if not fits or value.dtype.name != spec.dtype:
                raise ModelError(
                    f"{where} declares boundary tensor {name!r} as {_describe_spec(spec).split(': ', 1)[1]}, "
                    f"but at {described} it is {value.dtype.name}[{','.join(map(str, value.shape))}]"
                )
        try:
            got = private_session.run(None, {i.name: boundary[i.name] for i in private_session.get_inputs()})
        except Exception as exc:
            raise ModelError(f"the private part of {where} fails at {described}: {_first_line(exc)}") from None
        for output, mine, theirs in zip(model.graph.output, got, want):
            mine, theirs = np.asarray(mine), np.asarray(theirs)
            same = mine.shape == theirs.shape and (
                np.allclose(mine, theirs, rtol=1e-3, atol=1e-4, equal_nan=True)
                if mine.dtype.kind in "fc"
                else np.array_equal(mine, theirs)
            )
            if not same:
                raise ModelError(f"{where} does not reproduce output {output.name!r} of the whole model at {described}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def describe_cut_table(cuts: list[Cut]) -> list[dict]:
    """One row per cut for `modelcloak splits`: plain values, in column order, ready to print."""
    rows = []
    for cut in cuts:
        rows.append(
            {
                "index": cut.index,
                "after_node": cut.after_node,
                "boundary": ", ".join(_describe_spec(spec) for spec in cut.boundary),
                "boundary_tensors": len(cut.tensors),
                "boundary_bytes": cut.boundary_bytes,
                "private_layers": cut.private_layers,
                "private_nodes": cut.private_nodes,
                "private_parameters": cut.private_parameters,
                "private_weight_bytes": cut.private_weight_bytes,
                "private_flops": cut.private_flops,
            }
        )
    return rows


def _describe_spec(spec: TensorSpec) -> str:
    dims = ",".join("?" if d is None else str(d) for d in spec.shape)
    return f"{spec.name}: {spec.dtype}[{dims}]"


# -- building the parts ----------------------------------------------------------------------


def _build_part(
    graph: _Graph,
    dynamic: list[int],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    label: str,
    *,
    exclude: set[str],
    static_outputs: Sequence[str] = (),
) -> onnx.ModelProto:
    """A model of the given dynamic nodes plus the constant subgraphs and weights they need."""
    source = graph.model
    positions: set[int] = set(dynamic)
    weights: set[str] = set()
    for name in static_outputs:  # outputs computed from weights alone
        positions |= graph._closure(name).nodes
        weights |= graph._closure(name).weights
    for p in dynamic:
        positions |= graph.node_closure[p].nodes
        weights |= graph.node_closure[p].weights
    nodes = []
    for p in sorted(positions):
        node = onnx.NodeProto()
        node.CopyFrom(graph.nodes[p])
        node.name = graph.node_names[p]
        nodes.append(node)

    initializers = [t for t in source.graph.initializer if t.name in weights]
    sparse = [t for t in source.graph.sparse_initializer if t.values.name in weights]
    # IR < 4 requires every initializer to be listed as a graph input as well.
    if source.ir_version < 4:
        inputs = inputs + [
            v for v in source.graph.input if v.name in weights and v.name not in {i.name for i in inputs}
        ]
    produced = {o for node in nodes for o in node.output} - exclude
    value_info = [v for v in source.graph.value_info if v.name in produced and v.name not in {o.name for o in outputs}]

    part_graph = helper.make_graph(
        nodes,
        f"{source.graph.name or 'model'}_{label}",
        inputs,
        outputs,
        initializer=initializers,
        value_info=value_info,
        sparse_initializer=sparse,
    )
    part = helper.make_model(part_graph, opset_imports=list(source.opset_import))
    part.ir_version = source.ir_version
    part.producer_name = source.producer_name
    part.producer_version = source.producer_version
    part.functions.extend(_used_functions(nodes, source.functions))
    return part


def _used_functions(nodes: list[onnx.NodeProto], functions: Iterable[onnx.FunctionProto]) -> list[onnx.FunctionProto]:
    """Model-local functions the nodes call, directly or through other functions, in model order."""
    table = {(f.domain, f.name): f for f in functions}
    if not table:
        return []
    needed: set[tuple[str, str]] = set()
    stack = [(n.domain, n.op_type) for n in nodes]
    while stack:
        key = stack.pop()
        if key in table and key not in needed:
            needed.add(key)
            stack.extend((n.domain, n.op_type) for n in table[key].node)
    return [f for key, f in table.items() if key in needed]


# -- graph helpers ---------------------------------------------------------------------------


def _node_names(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    """Unique names: the node's own, else `<op_type>_<i>`; repeats get `_<i>` appended."""
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    names = []
    for i, node in enumerate(nodes):
        name = node.name or f"{node.op_type}_{i}"
        if name in seen or (not node.name and name in taken):
            base, suffix = name, i
            name = f"{base}_{suffix}"
            while name in seen or name in taken:
                suffix += 1
                name = f"{base}_{suffix}"
        seen.add(name)
        names.append(name)
    return names


def _subgraph_refs(node: onnx.NodeProto) -> list[str]:
    """Names an If/Loop/Scan body reads from the enclosing graph (implicit inputs)."""
    refs: list[str] = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            refs += _outer_refs(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            for sub in attr.graphs:
                refs += _outer_refs(sub)
    return refs


def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    refs: list[str] = []
    for node in graph.node:
        refs += [name for name in [*node.input, *_subgraph_refs(node)] if name and name not in defined]
        defined.update(o for o in node.output if o)
    refs += [v.name for v in graph.output if v.name not in defined]
    return list(dict.fromkeys(refs))


def _node_uses(node: onnx.NodeProto) -> list[str]:
    return list(dict.fromkeys([name for name in node.input if name] + _subgraph_refs(node)))


def _topological_order(nodes: list[onnx.NodeProto], uses: list[list[str]], available: set[str]) -> list[int]:
    """The graph's own order if valid, else Kahn's algorithm preferring the earliest node."""
    produced_by: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for out in node.output:
            if out:
                produced_by.setdefault(out, k)
    ready = set(available)
    valid = True
    for k, node in enumerate(nodes):
        if any(name not in ready and name in produced_by for name in uses[k]):
            valid = False
            break
        ready.update(o for o in node.output if o)
    if valid:
        return list(range(len(nodes)))

    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = {}
    for k in range(len(nodes)):
        producers = {produced_by[name] for name in uses[k] if name in produced_by and name not in available}
        producers.discard(k)
        waiting[k] = len(producers)
        for q in producers:
            consumers.setdefault(q, []).append(k)
    heap = [k for k in range(len(nodes)) if waiting[k] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        k = heapq.heappop(heap)
        order.append(k)
        for c in consumers.get(k, []):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(heap, c)
    if len(order) != len(nodes):
        stuck = next(k for k in range(len(nodes)) if waiting[k] > 0)
        raise ModelError(f"the graph has a cycle (node {nodes[stuck].name or nodes[stuck].op_type!r} is part of it)")
    return order


def _live(order: list[int], nodes: list[onnx.NodeProto], uses: list[list[str]], outputs: set[str]) -> list[int]:
    """The nodes of `order` that contribute to a graph output."""
    needed = set(outputs)
    keep = []
    for k in reversed(order):
        if any(o in needed for o in nodes[k].output if o):
            keep.append(k)
            needed.update(uses[k])
    return keep[::-1]


def _batch_symbol(model: onnx.ModelProto) -> str:
    """The symbol of the batch axis: a symbolic input dim named like "batch" wherever it sits (a
    sequence-first RNN has it on axis 1), else the first input's symbolic dim 0."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    for value in inputs:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and "batch" in dim.dim_param.lower():
                return dim.dim_param
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            return dims[0].dim_param
    return _DEFAULT_BATCH


def batch_symbol(model: onnx.ModelProto) -> str:
    """The name of the model's batch axis, as cuts declare it in their boundary shapes."""
    return _batch_symbol(model)


def _input_symbols(inputs: Sequence[onnx.ValueInfoProto], batch: str) -> list[str]:
    """Every symbolic input dim, the batch first; an unnamed dynamic dim gets a private name."""
    symbols = [batch]
    for value in inputs:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                name = dim.dim_param or f"\0{value.name}:{axis}"
                if name not in symbols:
                    symbols.append(name)
    return symbols


def _probe_plans(inputs: Sequence[onnx.ValueInfoProto], batch: str) -> Iterable[tuple[list[str], list[dict[str, int]]]]:
    """(symbols, runs): a base run, then one run per symbol with only that symbol moved by one."""
    symbols = _input_symbols(inputs, batch)
    for base, step in _PROBE_SCALES:
        values = {symbol: base + step * i for i, symbol in enumerate(symbols)}
        plans = [values] + [{**values, symbol: values[symbol] + 1} for symbol in symbols]
        yield symbols, plans


def _probe_feeds(inputs: Sequence[onnx.ValueInfoProto], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    feeds = {}
    for value in inputs:
        elem, dims = _value_type(value) or (TensorProto.FLOAT, [])
        shape = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(sizes[dim.dim_param or f"\0{value.name}:{axis}"])
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem or TensorProto.FLOAT))
        feeds[value.name] = np.full(shape, _PROBE_FILL if dtype.kind == "f" else 0, dtype=dtype)
    return feeds


def _name_dim(sizes: list[int], symbols: list[str], plans: list[dict[str, int]]) -> int | str | None:
    """A probed dim: a number if it never moved, a symbol if it tracked exactly one, else None."""
    if all(size == sizes[0] for size in sizes):
        return int(sizes[0])
    for symbol in symbols:
        if all(size == plan[symbol] for size, plan in zip(sizes, plans)):
            return None if symbol.startswith("\0") else symbol
    return None


def _quiet_options() -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return options


def _value_type(value: onnx.ValueInfoProto) -> tuple[int, list[int | str | None] | None] | None:
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return (tensor_type.elem_type, None)
    return (tensor_type.elem_type, shape_dims(tensor_type))


def _complete(entry: tuple[int, list | None] | None) -> bool:
    """Whether a type entry has a dtype, a rank and every dim (inference's "unk__N" is unknown)."""
    if entry is None or not entry[0] or entry[1] is None:
        return False
    return all(d is not None and not (isinstance(d, str) and d.startswith("unk__")) for d in entry[1])


def _weight_of(dims: Sequence[int], data_type: int) -> _Weight:
    elements = math.prod(dims) if dims else 1
    return _Weight(
        dims=tuple(int(d) for d in dims),
        data_type=data_type,
        elements=elements,
        nbytes=_nbytes(elements, data_type),
        parameter=elements >= 2 and (data_type in _FLOAT_TYPES or data_type in _QUANT_TYPES),
    )


def _constant_weight(node: onnx.NodeProto) -> _Weight:
    for attr in node.attribute:
        if attr.name == "value":
            return _weight_of(list(attr.t.dims), attr.t.data_type)
        if attr.name == "sparse_value":
            return _weight_of(list(attr.sparse_tensor.dims), attr.sparse_tensor.values.data_type)
        if attr.name == "value_floats":
            return _weight_of([len(attr.floats)], TensorProto.FLOAT)
        if attr.name == "value_ints":
            return _weight_of([len(attr.ints)], TensorProto.INT64)
        if attr.name == "value_float":
            return _weight_of([], TensorProto.FLOAT)
        if attr.name == "value_int":
            return _weight_of([], TensorProto.INT64)
    # value_string(s): no numeric payload, and no dims worth declaring.
    return _Weight(dims=None, data_type=TensorProto.STRING, elements=1, nbytes=0, parameter=False)


def _nbytes(elements: int, data_type: int) -> int:
    if data_type in _SUB_BYTE_BITS:
        return -(-elements * _SUB_BYTE_BITS[data_type] // 8)
    if data_type == TensorProto.STRING:
        return 0
    try:
        return elements * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0


def _spec_bytes(spec: TensorSpec) -> int:
    elements = math.prod(d if isinstance(d, int) else 1 for d in spec.shape)
    try:
        itemsize = np.dtype(spec.dtype).itemsize
    except TypeError:
        itemsize = 0
    return elements * itemsize
