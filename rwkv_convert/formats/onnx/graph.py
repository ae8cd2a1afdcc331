"""A small ONNX graph builder: ops by name, constants, weights kept inline or streamed to an external data
file, and recurrences that become a Scan over the time axis (or one plain step in a one-token graph)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...runtimes import onnx_checksums as checksums
from ...runtimes.onnx_layout import onnx_module

OPSET = 17  # LayerNormalization is opset 17; onnxruntime >= 1.14 runs it
IR_VERSION = 8  # onnx 1.23 writes IR 14 by default, which onnxruntime rejects
MS_DOMAIN = "com.microsoft"  # MatMulNBits
EXTERNAL_ALIGN = 64  # bytes: lets onnxruntime mmap the data file with aligned tensors



class WeightStore:
    """Initializers shared by the graphs of one export. Inline: kept as TensorProtos (files under 2 GB).
    External: each array is appended to one data file as it is made, and only a reference is kept, so the
    export holds one tensor at a time whatever the model's size."""

    def __init__(self, data_path: Path | None, location: str | None):
        self.onnx = onnx_module()
        self.protos: dict[str, object] = {}
        self.location = location
        self._data = open(data_path, "wb") if data_path is not None else None  # noqa: SIM115 (closed in close())
        self.nbytes = 0
        self.data_crcs: dict[str, int] = {}  # of the externally stored arrays (checksums.py)
        # Shared by every graph of the export: names stay unique across files that share initializers.
        self.counter = [0]
        self.consts: dict = {}

    def add(self, name: str, array: np.ndarray) -> str:
        onnx = self.onnx
        if name in self.protos:
            return name
        array = np.asarray(array, order="C")  # (ascontiguousarray turns a scalar into shape [1])
        if self._data is None or array.nbytes < 1024:  # small tensors stay inline: no seek per tensor at load
            self.protos[name] = onnx.numpy_helper.from_array(array, name)
            self.nbytes += array.nbytes
            return name
        return self.add_rows(name, array.shape, array.dtype, [array])

    def add_rows(self, name: str, shape: tuple[int, ...], dtype, chunks) -> str:
        """An initializer made of consecutive row blocks (arrays of `dtype`), written to the data file as each
        is made: a large table never has to be whole in memory. Inline exports join the blocks."""
        if name in self.protos:
            return name
        onnx, dtype = self.onnx, np.dtype(dtype)
        if self._data is None:
            return self.add(name, np.concatenate([np.asarray(c, dtype) for c in chunks]).reshape(shape))
        pad = -self._data.tell() % EXTERNAL_ALIGN
        self._data.write(b"\0" * pad)
        offset, crc, nbytes = self._data.tell(), 0, 0
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk, dtype)).cast("B")  # no bytes copy of a large tensor
            self._data.write(data)
            crc, nbytes = zlib.crc32(data, crc), nbytes + data.nbytes
        if nbytes != int(np.prod(shape)) * dtype.itemsize:
            raise RuntimeError(f"{name}: row blocks hold {nbytes} bytes, not the {list(shape)} {dtype} declared")
        self.data_crcs[name] = crc
        proto = onnx.TensorProto(name=name, dims=list(shape), data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.nbytes += nbytes
        self.protos[name] = proto
        return name

    def close(self) -> None:
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()


class Graph:
    """Nodes of one graph (or of a Scan body: `parent` set). Constants and weights always live in the root
    graph; a body reads them from the outer scope."""

    def __init__(self, store: WeightStore, single_step: bool = False, parent: Graph | None = None):
        self.onnx = onnx_module()
        self.store = store
        self.single_step = single_step  # a one-token graph: recurrences are one plain step, no Scan
        self.parent = parent
        self.root = parent.root if parent else self
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._count = store.counter
        self.used: dict[str, None] = {} if parent is None else parent.root.used  # initializers needed, in order
        self._consts = store.consts

    def name(self, hint: str) -> str:
        self._count[0] += 1
        return f"{hint}_{self._count[0]}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", hint: str | None = None,
           **attrs) -> str | list[str]:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        # each node named after its first output: unique, as tools that edit graphs by node name need
        # (onnxruntime's GPTQ quantizer looks MatMuls up by name)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs, name=outs[0], domain=domain,
                                                     **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        """A small constant (scalar, shape, axes), deduplicated."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.root.store.add(self.name("const"), array)
        name = self._consts[key]
        if name not in self.used:
            self.used[name] = None
        return name

    def has_weight(self, name: str) -> bool:
        return name in self.root.store.protos

    def weight(self, name: str, array: np.ndarray | None) -> str:
        """A named initializer; array None: one the store already holds."""
        if array is not None:
            self.root.store.add(name, array)
        if name not in self.used:
            self.used[name] = None
        return name

    def input(self, name: str, elem_type, shape) -> str:
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type, shape) -> str:
        self.nodes.append(self.onnx.helper.make_node("Identity", [value], [name], name=name))
        self.outputs.append(self.onnx.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    # ---- shorthands ------------------------------------------------------------------------------
    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.const(list(axes), np.int64))

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", x, self.const(list(axes), np.int64))

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", x, self.const(list(shape), np.int64))

    def gather(self, x: str, index: int, axis: int) -> str:
        return self.op("Gather", x, self.const(index, np.int64), axis=axis)

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def recurrence(self, step: Callable, states: list[str], sequences: list[str], elem_types: list[int],
                   n_out: int) -> tuple[list[str], list[str]]:
        """Run `step(graph, states, slices) -> (new_states, outputs)` along axis 1 (time) of `sequences`
        ([B, T, ...] each). One-token graphs call it once on the squeezed slices; sequence graphs build a
        Scan whose body is the same step. elem_types: ONNX types of states then sequences then outputs."""
        if self.single_step:
            new_states, outs = step(self, states, [self.squeeze(s, 1) for s in sequences])
            return new_states, [self.unsqueeze(o, 1) for o in outs]
        helper = self.onnx.helper
        body = Graph(self.store, parent=self)
        n_state = len(states)
        body_states = [body.input(body.name("s_in"), t, None) for t in elem_types[:n_state]]
        body_slices = [body.input(body.name("x_in"), t, None) for t in elem_types[n_state:n_state + len(sequences)]]
        new_states, outs = step(body, body_states, body_slices)
        out_types = elem_types[:n_state] + elem_types[n_state + len(sequences):]
        for value, t in zip(list(new_states) + list(outs), out_types, strict=True):
            body.output(value, body.name("out"), t, None)
        graph = helper.make_graph(body.nodes, self.name("scan_body"), body.inputs, body.outputs)
        results = self.op("Scan", *states, *sequences, n_out=n_state + n_out, body=graph,
                          num_scan_inputs=len(sequences), scan_input_axes=[1] * len(sequences),
                          scan_output_axes=[1] * n_out)
        results = results if isinstance(results, list) else [results]
        return results[:n_state], results[n_state:]

    def model(self, doc: str, metadata: dict[str, str]):
        onnx = self.onnx
        helper = onnx.helper
        graph = helper.make_graph(self.nodes, "rwkv", self.inputs, self.outputs,
                                  initializer=[self.store.protos[n] for n in self.used])
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="rwkv-convert", doc_string=doc)
        model.ir_version = IR_VERSION
        helper.set_model_props(model, metadata)
        checksums.seal(model, {n: self.store.data_crcs[n] for n in self.used if n in self.store.data_crcs})
        return model
